"""One benchmark, two revisions of trustmesh, same run: before/after numbers that the
machine's noise cannot fake (rounds alternate A, B, A, B …; the best of each is kept).

    python bench/bench_revisions.py REV_A REV_B [--rounds N] -- bench/bench_policy.py ARGS…

Each revision is checked out (``git worktree add --detach``) into a temporary directory
and its own copy of the benchmark runs with that revision's ``src`` first on PYTHONPATH,
in this project's virtualenv (same interpreter, same dependencies). The benchmark must
print one JSON document; numeric leaves are compared (``b / a``). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _leaves(doc: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            out |= _leaves(value, f"{prefix}{key}.")
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        out[prefix.rstrip(".")] = float(doc)
    return out


def _run(tree: Path, bench: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    script = tree / bench[0]
    done = subprocess.run(
        [sys.executable, str(script), *bench[1:]],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return _leaves(json.loads(done.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:]
    if "--" not in argv:
        parser.error("give the benchmark after --: -- bench/x.py ARGS")
    split = argv.index("--")
    args, bench = parser.parse_args(argv[:split]), argv[split + 1 :]
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as tmp:
        trees = {}
        for label, rev in (("before", args.before), ("after", args.after)):
            tree = Path(tmp) / label
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev],
                check=True,
            )
            trees[label] = tree
        try:
            runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for _ in range(args.rounds):
                for label in ("before", "after"):
                    runs[label].append(_run(trees[label], bench))
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    # Lower is better for times (…_s, …_us, …_ms), higher for rates: keep each side's best.
    keys = sorted(set(runs["before"][0]) & set(runs["after"][0]))

    def best(label: str, key: str) -> float:
        values = [run[key] for run in runs[label]]
        return max(values) if key.endswith("_per_s") else min(values)

    report = {
        "before": args.before,
        "after": args.after,
        "rounds": args.rounds,
        "bench": bench,
        "metrics": {
            key: {
                "before": best("before", key),
                "after": best("after", key),
                "after_over_before": round(best("after", key) / best("before", key), 3)
                if best("before", key)
                else None,
            }
            for key in keys
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
