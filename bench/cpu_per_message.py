"""Engine CPU per delivered message, per role, from the real processes' CPU times.

Runs ``--messages`` messages through a fresh ``Engine`` (2 workers by default,
10,000 recipients, 100-byte payloads packed once into a ``msgspec.Raw``,
``submit_many`` in chunks of 4,096) and prints one JSON object: msgs/s from the
first submit to the end of ``drain()``, and CPU µs per delivered message for the
dispatcher (this process: ``time.process_time()``, building and submitting
included), the workers together and the monitor (psutil ``cpu_times`` of their
pids, user + system), plus ``total``.  ``others`` is the rest of the machine's
busy CPU over the same time, so a noisy neighbour is visible.

Cases (handlers from ``bench.handlers``, which the old trees have too):

- ``noop``: ``bench.handlers:noop``, a sync function that does nothing;
- ``async_1ms``: ``bench.handlers:io_1ms``, ``async def`` awaiting 1 ms;
- ``cpu_50us``: ``bench.handlers:cpu_50us``, ~50 µs of pure Python.

``--tree`` names the source tree whose ``engine`` is measured (default: the one
this file is in); it goes first on ``sys.path`` and ``PYTHONPATH``, so every
engine process imports that tree (``bench/compare_trees.py`` passes an old one)::

    python3 -m bench.cpu_per_message --case noop --messages 400000
    python3 -m bench.cpu_per_message --case noop --tree /tmp/ringway-old

``engine_file`` in the output names the tree that was measured.

``--broker URL`` runs the engine as one cluster node on that Redis (16
partitions, a namespace of its own, deleted after the run): msgs/s from the
first submit until the node delivered every message, and the node's CPU (not
Redis's)::

    python3 -m bench.cpu_per_message --case noop --messages 200000 --broker redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import psutil
import uvloop

CASES = {
    "noop": "bench.handlers:noop",
    "async_1ms": "bench.handlers:io_1ms",
    "cpu_50us": "bench.handlers:cpu_50us",
}
RECIPIENTS = 10_000
PAYLOAD_BYTES = 100
CHUNK = 4_096
DRAIN_TIMEOUT_S = 300.0
PARTITIONS = 16  # with --broker
HERE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0))


def _worker_pids(eng: Any) -> list[int]:
    """The workers: the monitor's children (waits for them all to be up)."""
    deadline = time.monotonic() + 30
    while True:
        children = psutil.Process(eng.monitor.pid).children()
        if len(children) >= eng.config.workers or time.monotonic() > deadline:
            return [c.pid for c in children]
        time.sleep(0.01)


async def _settled(eng: Any, delivered: int) -> bool:
    """Until ``delivered`` messages were delivered: drain(), or in cluster mode (where
    drain() returns once Redis has them) the node's own delivered count."""
    if eng.cluster is None:
        return bool(await eng.drain(timeout=DRAIN_TIMEOUT_S))
    import asyncio

    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while eng.stats()["delivered"] < delivered:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def _owns_every_partition(eng: Any) -> None:
    import asyncio

    deadline = time.monotonic() + 60
    while len(eng.stats()["cluster"]["leases"]["owned"]) < PARTITIONS:
        if time.monotonic() > deadline:
            raise SystemExit("the node did not take every partition within 60 s")
        await asyncio.sleep(0.05)


def _drop_namespace(url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def measure(case: str, messages: int, workers: int, broker: str = "") -> dict[str, Any]:
    """One run on a fresh engine; the figures as a JSON-ready dict."""
    from engine import Config

    if case == "cpu_50us":
        from bench import handlers  # calibrates once here; the workers inherit the count

        _ = handlers.CPU_LOOPS
    cluster: dict[str, Any] = {}
    if broker:
        ns = f"cpm-{os.getpid()}-{time.time_ns()}"
        cluster = {"broker": broker, "namespace": ns, "node_id": ns, "partitions": PARTITIONS}
    config = Config.from_env(
        env={}, workers=workers, sink="python", stats_interval_s=0.1, **cluster
    )
    try:
        return await _run(case, config, messages)
    finally:
        if broker:
            _drop_namespace(broker, cluster["namespace"])


async def _run(case: str, config: Any, messages: int) -> dict[str, Any]:
    import engine
    from engine import Engine
    from ipc.codec import pack_payload

    payload = pack_payload(b"x" * PAYLOAD_BYTES)
    items = [(f"Agent-{i % RECIPIENTS}", payload) for i in range(messages)]
    chunks = [items[i : i + CHUNK] for i in range(0, messages, CHUNK)]
    async with Engine(CASES[case], config) as eng:
        if eng.cluster is not None:
            await _owns_every_partition(eng)
        # A warm-up message per worker, so imports and first-call costs stay outside.
        await eng.submit_many([(f"Agent-{i}", payload) for i in range(64)])
        await _settled(eng, 64)
        monitor = eng.monitor.pid
        pids = _worker_pids(eng)
        w0 = sum(_cpu_s(p) for p in pids)
        m0 = _cpu_s(monitor)
        busy0 = _machine_busy_s()
        here0 = time.process_time()
        t0 = time.perf_counter()
        for chunk in chunks:
            await eng.submit_many(chunk)
        drained = await _settled(eng, 64 + messages)
        seconds = time.perf_counter() - t0
        here = time.process_time() - here0
        busy = _machine_busy_s() - busy0
        w = sum(_cpu_s(p) for p in pids) - w0
        m = _cpu_s(monitor) - m0
        stats = eng.stats()
    delivered = stats["delivered"] - 64
    if not drained or delivered != messages:
        raise SystemExit(f"run incomplete: drained={drained}, delivered {delivered} of {messages}")
    per_msg = {"dispatcher": here, "workers": w, "monitor": m}
    per_msg["total"] = here + w + m
    return {
        "case": case,
        "messages": messages,
        "workers": config.workers,
        "seconds": seconds,
        "msgs_per_s": messages / seconds,
        "cpu_us_per_msg": {k: v / messages * 1e6 for k, v in per_msg.items()},
        "others_cores": max(0.0, busy - per_msg["total"]) / seconds,
        "load_avg_1m": os.getloadavg()[0],
        "engine_file": engine.__file__,
        "cluster": eng.cluster is not None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="noop")
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tree", default=HERE_TREE, help="source tree to measure")
    parser.add_argument("--broker", default="", help="Redis URL: run as one cluster node")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.workers < 1:
        parser.error("--messages and --workers must be at least 1")
    tree = os.path.abspath(args.tree)
    if not os.path.isfile(os.path.join(tree, "engine", "__init__.py")):
        parser.error(f"--tree {tree} holds no engine package")
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if main_spec is not None and tree != HERE_TREE:
        # Run as ``-m``: a spawned monitor would re-import this module by name from
        # the other tree, which may not have it.  Run again as a file instead.
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    if "engine" in sys.modules or "ipc" in sys.modules:
        parser.error("engine was imported before --tree could take effect")
    sys.path.insert(0, tree)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [tree, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        if name != __name__:
            del sys.modules[name]  # bench.handlers from the measured tree too
    result = uvloop.run(measure(args.case, args.messages, args.workers, args.broker))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
