"""Scoring speed: 1,000,000 PHQ-9 rows against a plain polars sum of the same nine columns.

The scored path reads the instrument definition and adds phq9_total, phq9_band, phq9_missing
and phq9_valid with missing codes, range checks and proration; the floor only adds the nine
columns. Both run on the same frame in the same run, alternated 15 times; medians, and the median of
the 15 ratios.

    python bench/scoring.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.instruments import instrument, score  # noqa: E402


def timed(action, repeat: int = 9) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    phq9 = instrument("phq9")
    rng = random.Random(1)
    answers = [0, 1, 2, 3] * 24 + [555, -1, None, 4]  # about 4 % coded missing, blank or invalid
    frame = pl.DataFrame(
        {c: [rng.choice(answers) for _ in range(args.rows)] for c in phq9.items},
        schema={c: pl.Int64 for c in phq9.items},
    )
    print(f"{args.rows} PHQ-9 rows, {len(phq9.items)} items")
    scored = score(frame, phq9)
    assert scored["phq9_total"].drop_nulls().is_between(0, 27).all()
    floors, fulls = [], []
    for _ in range(15):  # alternated, so both see the same moments of a noisy machine
        floors.append(
            timed(lambda: frame.with_columns(pl.sum_horizontal(phq9.items).alias("s")), 1)
        )
        fulls.append(timed(lambda: score(frame, phq9), 1))
    floor, full = statistics.median(floors), statistics.median(fulls)
    print(f"floor: polars sum of the nine columns: {args.rows / floor:12,.0f} rows/s")
    print(f"score(table, 'phq9'):                  {args.rows / full:12,.0f} rows/s")
    ratio = statistics.median(f / g for f, g in zip(floors, fulls, strict=True))
    print(
        f"ratio score/floor: {ratio:.2f} (target >= 0.30: {'met' if ratio >= 0.3 else 'not met'})"
    )


if __name__ == "__main__":
    main()
