"""``engine bench-batch``: the design's sequential-against-batch table on an embedded engine.

The workload and the measuring are `engine.stress.batchbench`; ``engine cache
clear``, which talks to a running service, is with the service commands.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from engine.cli.flags import positive_float, positive_int
from engine.config import Config
from engine.exitcodes import ExitCode


def add_batch_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``bench-batch`` to the ``engine`` parser."""
    bench = sub.add_parser(
        "bench-batch",
        help="measure sequential requests against request_many (the design's batch table)",
        description="Run N requests with a share of duplicates against a handler taking "
        "--handler-ms, one after another and then as one batch (cold and warm cache), on an "
        "embedded engine; print a Markdown table. Beyond --sequential-max requests the "
        "sequential row is measured on a sample and scaled (marked est.).",
    )
    bench.add_argument("--requests", type=positive_int, default=20, help="N (default 20)")
    bench.add_argument(
        "--duplicates", type=_share, default=0.3, help="share of repeats (default 0.3)"
    )
    bench.add_argument(
        "--handler-ms", type=positive_float, default=150.0, help="handler time (default 150)"
    )
    bench.add_argument(
        "--concurrency", type=positive_int, default=20, help="batch concurrency (default 20)"
    )
    bench.add_argument("--workers", type=positive_int, default=2, help="workers (default 2)")
    bench.add_argument(
        "--cache-size",
        type=positive_int,
        default=None,
        help="cached responses kept (default ENGINE_CACHE_SIZE, 2000)",
    )
    bench.add_argument(
        "--sequential-max",
        type=positive_int,
        default=200,
        help="most requests run one after another (default 200)",
    )
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    bench.set_defaults(run=_cmd_bench)


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a share in [0, 1), got {text!r}")
    return value


def _cmd_bench(args: argparse.Namespace) -> int:
    import uvloop

    from engine.stress.batchbench import as_json, render, run_bench

    rows = uvloop.run(
        run_bench(
            args.requests,
            args.duplicates,
            args.handler_ms,
            args.concurrency,
            workers=args.workers,
            sequential_max=args.sequential_max,
            cache_size=args.cache_size,
        )
    )
    if args.json:
        print(json.dumps(as_json(rows), indent=2))
    else:
        size = args.cache_size or Config.from_env().cache_size
        print(render(rows, args.handler_ms, args.concurrency, size))
    return ExitCode.OK
