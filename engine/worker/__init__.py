"""The worker process: fetches frames from its shard's rings and delivers them to the sink.

Loaded in every worker, so it imports only what the hot path needs.
"""
