"""Async vs sync samples/s on the default tiny workload (issue 3's benchmark); `asympo bench` runs it too.

Run: .venv/bin/python benchmarks/async_vs_sync.py [--steps 40] [--repeats 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from asympo.bench.runtime import VARIANTS, compare_runtimes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = compare_runtimes(Path(tmp), args.steps, args.repeats, VARIANTS, args.overrides)
    print("| runtime | samples/s (median) | staleness mean / max | worker busy | learner busy |")
    print("|---|---|---|---|---|")
    for name, r in rates.items():
        print(
            f"| {name} | {r['samples_per_s']:.0f} | {r['staleness_mean']:.2f} / {r['staleness_max']} "
            f"| {r['worker_busy']:.0%} | {r['learner_busy']:.0%} |"
        )
    print(f"\nasync / sync = {rates['async']['samples_per_s'] / rates['sync']['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
