"""``make fuzz``: the big differential run, as JSON.

    python -m tests.fuzz [--validate-sets N] [--request-sets N] [--seed S] [--workers W]

Seeds ``S .. S+N`` are generated (tests/fuzz/policygen.py); every set ``validate``
accepts is translated and handed to ``envoy --mode validate`` in batches, and the first
``--request-sets`` of them also run as listeners of a real Envoy, each with its requests,
compared with the evaluator. Batches run in ``--workers`` processes. Exit 1 on any
rejection or disagreement (printed, with the seed that reproduces it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tests.fuzz.differential import Tally, differential_batch, validate_batch

BATCH = 1000  # sets per `envoy --mode validate`
REQUEST_BATCH = 100  # sets (listeners) per running Envoy


def _validate(first: int, count: int) -> Tally:
    with tempfile.TemporaryDirectory(prefix="fuzz-validate-") as workdir:
        return asyncio.run(validate_batch(range(first, first + count), Path(workdir)))


def _requests(first: int, count: int, network: int) -> Tally:
    with tempfile.TemporaryDirectory(prefix="fuzz-envoy-") as workdir:
        seeds = range(first, first + count)
        return asyncio.run(differential_batch(seeds, Path(workdir), network=network))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz")
    parser.add_argument("--validate-sets", type=int, default=100_000)
    parser.add_argument("--request-sets", type=int, default=5_500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    checked, requested = Tally(), Tally()
    with ProcessPoolExecutor(args.workers) as pool:
        # The request sets are the first seeds; validate-only covers the rest, so every
        # seed is checked by Envoy exactly once.
        # Each running Envoy gets its own 127.N/16 (N in 200..249): see _addresses.
        request_jobs = [
            pool.submit(
                _requests,
                args.seed + offset,
                min(REQUEST_BATCH, args.request_sets - offset),
                200 + job % 50,
            )
            for job, offset in enumerate(range(0, args.request_sets, REQUEST_BATCH))
        ]
        first, rest = args.seed + args.request_sets, args.validate_sets - args.request_sets
        validate_jobs = [
            pool.submit(_validate, first + offset, min(BATCH, rest - offset))
            for offset in range(0, max(rest, 0), BATCH)
        ]
        for job in request_jobs:
            tally = job.result()
            requested.add(tally)
            checked.sets += tally.sets
            checked.refused_by_validate += tally.refused_by_validate
            checked.rejected_by_envoy += tally.rejected_by_envoy
        for job in validate_jobs:
            checked.add(job.result())
    report = {
        "seeds": [args.seed, args.seed + max(args.validate_sets, args.request_sets)],
        "policy_sets_generated": checked.sets,
        "refused_by_validate": checked.refused_by_validate,
        "accepted_by_validate_and_checked_by_envoy": checked.sets - checked.refused_by_validate,
        "accepted_by_validate_rejected_by_envoy": len(checked.rejected_by_envoy),
        "requests_through_envoy": requested.requests,
        "verdict_or_rule_differences": len(requested.disagreements),
        "answers": dict(sorted(requested.answers.items())),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    problems = checked.rejected_by_envoy + requested.disagreements
    for problem in problems[:50]:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
