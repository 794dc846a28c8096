"""``engine serve``: lifecycle and signals, the binary TCP/unix ingress, HTTP, metrics, logs."""
