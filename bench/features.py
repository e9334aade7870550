"""Behavioural features against one scan of the same sensor tables.

Writes the sensor tables of a study of 200 subjects x 28 days straight into the tables layout
(``tables/<study>/<sensor>/day=<day>/subject=<id>/part-<lo>-<hi>.parquet``, the columns and
types of ``sensor_schema(sensor).columns()``): each subject's days are drawn by the simulator's
timeline (home and work, commutes, walks, sleep, phone gaps, app sessions; Europe/Berlin), and
its records are derived from the timeline with numpy: location every 10 minutes, activity
every 5 minutes, hourly cumulative app-usage snapshots, accelerometer at 5 Hz while moving and
for 30 minutes after (as the app records). Subjects are enrolled with a device each, and the
tables' build marks are set as a build would set them. Then it prints, in the same run:

- the floor: one polars scan of every file of the tables counting rows per subject-day;
- the features: ``write_features(config, study, rebuild=True, processes=<cores>)``, and its
  ratio to the floor (target: within 3x);
- a second floor that reads the columns the features read (what any computation must decode);
- the incremental run after a 29th day for every subject, against the full run;
- the peak memory of the features' process tree (the sum of the RSS of the process and its
  workers, sampled every 50 ms; target: at most 1 GiB).

Timings run in a fresh subprocess each (imports excluded, workers' start included).

    python bench/features.py [--subjects 200] [--days 28] [--processes N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from workbench.sensors.chunks import FRESH_COMPRESSION  # noqa: E402
from workbench.sensors.parts import part_name, partition_folder  # noqa: E402
from workbench.sensors.schemas import sensor_schema  # noqa: E402
from workbench.simulators.days import (  # noqa: E402
    APPS,
    ON_FOOT,
    RHYTHM,
    RUNNING,
    STILL,
    WALKING,
    make_profile,
    make_timeline,
)

STUDY = "bench"
ZONE = "Europe/Berlin"
START = datetime.date(2024, 3, 4)  # a Monday; the clocks change on the 28th day
SENSORS = ["location", "activity", "application_usage", "accelerometer"]
GIB = 1024**3
RATIO_TARGET = 3.0
MEMORY_TARGET = GIB
FLOOR_REPEATS = 3
PROVIDERS = ("gps", "fused", "network")


# ---------------------------------------------------------------------------- the tables


def subject_records(index: int, subject: str, days: int, seed: int) -> tuple[dict, dict]:
    """The four sensors' records of one subject over ``days`` + 1 days (the last one is the
    day the incremental run adds), as frames with an epoch-millisecond ``timestamp``."""
    rng = random.Random(seed * 1_000_003 + index)
    profile = make_profile(subject, ZONE, rng)
    tl = make_timeline(profile, START, days + 1, rng)
    r = np.random.default_rng([seed, index])
    n = len(tl.mode)
    frames = {}

    # location: every 10 minutes with the phone on, the provider's accuracy, 3 % bad fixes,
    # the noise of the fix, and the phone's rotation in degree space
    m = np.arange(profile.phase, n, 10)
    m = m[tl.phone[m]]
    provider = r.choice(3, size=len(m), p=[0.6, 0.3, 0.1])
    accuracy = r.uniform(np.array([3, 5, 20])[provider], np.array([15, 30, 80])[provider])
    bad = r.random(len(m)) < 0.03
    provider[bad], accuracy[bad] = 2, r.uniform(150, 1500, bad.sum())
    north, east = (r.normal(0, 1, len(m)) * accuracy / 2 / 1000 for _ in range(2))
    lat = tl.lat[m] + north / 111.32
    lon = tl.lon[m] + east / (111.32 * np.cos(np.radians(tl.lat[m])))
    lat0, lon0, degrees = profile.rotation
    theta, scale = math.radians(degrees), abs(math.cos(math.radians(lat0)))
    frames["location"] = pl.DataFrame(
        {
            "timestamp": tl.start_ms + m * 60_000 + r.integers(0, 60_000, len(m)),
            "lat": lat0 + math.sin(theta) * (lon - lon0) * scale + math.cos(theta) * (lat - lat0),
            "lon": lon0 + math.cos(theta) * (lon - lon0) - math.sin(theta) * (lat - lat0) / scale,
            "accuracy": np.round(accuracy, 1),
            "provider": np.array(PROVIDERS)[provider],
        }
    )

    # activity: a detection every 5 minutes; walking and running also give ON_FOOT
    m = np.arange(profile.phase % 5, n, 5)
    m = m[tl.phone[m]]
    ts = tl.start_ms + m * 60_000 + r.integers(0, 60_000, len(m))
    mode = tl.mode[m].astype(np.int64)
    foot = np.isin(mode, (WALKING, RUNNING))
    codes = np.concatenate([mode, np.full(foot.sum(), ON_FOOT)])
    frames["activity"] = pl.DataFrame(
        {
            "timestamp": np.concatenate([ts, ts[foot]]),
            "activityType": codes,
            "confidence": r.integers(70, 101, len(codes)).astype(np.float64),
        }
    ).sort("timestamp")

    # accelerometer: 5 Hz while moving and for 30 minutes after
    idx = np.arange(n)
    moved = np.maximum.accumulate(np.where(tl.mode != STILL, idx, -(10**9)))
    m = np.flatnonzero(tl.phone & (idx - moved <= 30))
    table = np.zeros((9, 3))
    for code, values in RHYTHM.items():
        table[code] = values
    amp, freq, noise = (table[tl.mode[m].astype(np.int64), i][:, None] for i in range(3))
    steps = np.arange(300)
    shape = (len(m), 300)
    wave = 9.81 + amp * np.sin(2 * np.pi * freq * (m[:, None] * 60 + steps * 0.2))
    frames["accelerometer"] = pl.DataFrame(
        {
            "timestamp": (tl.start_ms + m[:, None] * 60_000 + steps * 200).ravel(),
            "x": (r.normal(0, 1, shape) * noise).ravel(),
            "y": (r.normal(0, 1, shape) * noise).ravel(),
            "z": (wave + r.normal(0, 1, shape) * noise).ravel(),
        }
    )

    # application usage: at minute 59 of each hour with the phone on, per app used so far
    # that local day, its foreground time since local midnight
    parts = []
    for _date, begin, end in tl.days():
        app = tl.app[begin:end]
        at = np.arange(59, end - begin, 60)
        at = at[tl.phone[begin + at]]
        if not len(at):
            continue
        for k, name in enumerate(APPS):
            used = app == k
            count = np.cumsum(used)[at - 1]
            last = np.maximum.accumulate(np.where(used, np.arange(len(app)), -1))[at - 1]
            keep = count > 0
            if not keep.any():
                continue
            ts = tl.start_ms + (begin + at[keep]) * 60_000 + 30_000
            parts.append(
                pl.DataFrame(
                    {
                        "timestamp": ts,
                        "appName": [name] * int(keep.sum()),
                        "beginTimeStamp": np.full(keep.sum(), tl.start_ms + begin * 60_000),
                        "endTimeStamp": ts,
                        "lastTimeUsed": tl.start_ms + (begin + last[keep] + 1) * 60_000,
                        "totalTimeinForeground": count[keep] * 60_000,
                    }
                )
            )
    frames["application_usage"] = pl.concat(parts).sort("timestamp")
    return frames, {"device": profile.device, "joined": tl.start_ms, "days": tl.dates}


def write_subject(tables: str, index: int, subject: str, days: int, seed: int) -> dict:
    """Write one subject's parts: its first ``days`` days as batch 1, the next day as batch 2."""
    frames, about = subject_records(index, subject, days, seed)
    extra = about["days"][days]
    rows = 0
    for sensor, frame in frames.items():
        columns = sensor_schema(sensor).columns()
        time_ = pl.from_epoch("timestamp", time_unit="ms").dt.replace_time_zone("UTC")
        typed = (
            frame.with_columns(
                subject=pl.lit(subject),
                device=pl.lit(about["device"]),
                time=time_,
                local_time=time_.dt.convert_time_zone(ZONE).dt.replace_time_zone(None),
                batch=pl.when(pl.col("timestamp") >= _midnight(extra)).then(2).otherwise(1),
            )
            .with_columns(day=pl.col("local_time").dt.date())
            .select(
                [
                    pl.col(c).cast(t)
                    if c in frame.columns or c in _MADE
                    else pl.lit(None, t).alias(c)
                    for c, t in columns.items()
                ]
            )  # fmt: skip
        )
        for (day,), part in typed.partition_by("day", as_dict=True).items():
            mark = 2 if day == extra else 1
            folder = partition_folder(Path(tables), STUDY, sensor, day, subject)
            folder.mkdir(parents=True, exist_ok=True)
            part.sort("device", "time").write_parquet(
                folder / part_name(mark, mark), compression=FRESH_COMPRESSION
            )
            rows += part.height
    return {"subject": subject, "device": about["device"], "joined": about["joined"], "rows": rows}


_MADE = {"subject", "device", "time", "local_time", "day", "batch"}


def _midnight(day: datetime.date) -> int:
    import zoneinfo

    moment = datetime.datetime.combine(day, datetime.time(), zoneinfo.ZoneInfo(ZONE))
    return int(moment.timestamp() * 1000)


def make_study(work: Path, subjects: int, days: int, processes: int, seed: int) -> tuple[Path, int]:
    """A home with the study, its subjects and devices, and the tables of ``days`` days; the
    parts of day ``days`` + 1 are moved aside (``work/extra``) for the incremental run."""
    from workbench.catalog import open_catalog
    from workbench.config import init_home
    from workbench.enrollment import enroll
    from workbench.pool import DataPool
    from workbench.simulators.phones import IngestPhones
    from workbench.studies import create_study, definition_from_options

    config = init_home(work / "home")
    catalog = open_catalog(config)
    try:
        definition = definition_from_options(
            STUDY, duration_days=days + 1, sensors=SENSORS, timezone=ZONE
        )
        create_study(catalog, definition)
        people = enroll(catalog, STUDY, subjects)
    finally:
        catalog.dispose()
    tables = str(DataPool.of(config).tables)
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        made = list(
            pool.map(
                write_subject,
                [tables] * subjects,
                range(subjects),
                [p.subject for p in people],
                [days] * subjects,
                [seed] * subjects,
            )
        )
    phones = IngestPhones(config)
    try:
        for person, about in zip(people, made, strict=True):
            phones.register(
                STUDY, person.subject, about["device"], person.token, joined=about["joined"]
            )
    finally:
        phones.close()
    # day days+1 waits aside until the incremental run
    extra_day = START + datetime.timedelta(days=days)
    for sensor in SENSORS:
        source = Path(tables) / STUDY / sensor / f"day={extra_day.isoformat()}"
        if source.is_dir():
            shutil.move(source, work / "extra" / sensor / source.name)
    set_marks(config, 1)
    return config.home, sum(a["rows"] for a in made)


def set_marks(config, mark: int) -> None:
    """Record the tables as built up to ledger id ``mark``, as a build does."""
    from workbench.catalog import open_catalog
    from workbench.sensors.tables import _set_watermark
    from workbench.subjects import study_zones

    catalog = open_catalog(config)
    try:
        default, own = study_zones(catalog, STUDY)
        zones = json.dumps({"study": default, "subjects": own}, sort_keys=True)
        for sensor in SENSORS:
            _set_watermark(catalog, STUDY, sensor, mark, zones)
    finally:
        catalog.dispose()


# ---------------------------------------------------------------------------- measuring


def measure(home: Path, what: str, processes: int) -> dict:
    """Run ``what`` in a fresh interpreter; its own timing, and the peak RSS of its tree."""
    import psutil

    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--measure",
            what,
            "--home",
            str(home),
            "--processes",
            str(processes),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    peak = 0
    process = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            total = 0
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"{what} failed with exit code {child.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["tree_peak"] = peak
    return result


def child(what: str, home: Path, processes: int) -> None:
    """The measured side: print one JSON line."""
    import resource

    from workbench.config import load_config
    from workbench.features.build import write_features
    from workbench.sensors.loading import table_files

    config = load_config(home)
    if what in ("floor", "read"):
        files = {s: table_files(config, STUDY, s) for s in SENSORS}
        if what == "floor":
            columns = {s: ["subject", "day"] for s in SENSORS}
        else:  # the columns the families and the yield read
            base = ["subject", "device", "day", "time", "local_time"]
            columns = {
                "location": [*base, "lat", "lon", "accuracy"],
                "activity": [*base, "activityType", "confidence"],
                "application_usage": [*base, "appName", "totalTimeinForeground"],
                "accelerometer": [*base, "x", "y", "z"],
            }
        seconds = []
        for _ in range(FLOOR_REPEATS):
            started = time.perf_counter()
            scans = [
                pl.scan_parquet(files[s], hive_partitioning=False)
                .select(columns[s])
                .group_by("subject", "day")
                .agg(pl.len().alias("n"), *_touch(columns[s]))
                .select("subject", "day", "n")
                for s in SENSORS
            ]
            counts = pl.concat(scans).group_by("subject", "day").agg(pl.col("n").sum()).collect()
            seconds.append(time.perf_counter() - started)
        print(json.dumps({"seconds": statistics.median(seconds), "all": seconds,
                          "subject_days": counts.height, "rows": int(counts["n"].sum())}))  # fmt: skip
        return
    started = time.perf_counter()
    run = write_features(config, STUDY, rebuild=(what == "full"), processes=processes)
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "rows": run.rows, "recomputed": len(run.recomputed),
                      "self_peak": rss, "worker_peak": workers}))  # fmt: skip


def _touch(columns: list[str]) -> list[pl.Expr]:
    """Aggregates that make polars decode every column asked for (not only count rows)."""
    return [pl.col(c).max().alias(f"_{c}") for c in columns if c not in ("subject", "day")]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="build the study in DIR and keep it")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        child(args.measure, args.home, args.processes)
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-features-"))
    if args.keep:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    try:
        started = time.perf_counter()
        home, rows = make_study(work, args.subjects, args.days, args.processes, args.seed)
        size = sum(p.stat().st_size for p in (home / "pool" / "tables").rglob("*.parquet"))
        print(
            f"tables: {args.subjects} subjects x {args.days} days, {rows:,} rows with day "
            f"{args.days + 1}, {size / 1e9:.2f} GB of Parquet without it, written in "
            f"{time.perf_counter() - started:.0f} s; {args.processes} processes"
        )
        floor = measure(home, "floor", args.processes)
        print(
            f"floor (one scan, rows per subject-day):  {floor['seconds']:7.2f} s  "
            f"({floor['rows']:,} rows, {floor['subject_days']:,} subject-days; median of "
            f"{FLOOR_REPEATS})"
        )
        read = measure(home, "read", args.processes)
        print(
            f"read floor (the columns features read):  {read['seconds']:7.2f} s  "
            f"(median of {FLOOR_REPEATS})"
        )
        full = measure(home, "full", args.processes)
        ratio = full["seconds"] / floor["seconds"]
        print(
            f"features, full run (rebuild):            {full['seconds']:7.2f} s  "
            f"({full['rows']:,} subject-days, {full['recomputed']} subjects)"
        )
        print(
            f"  features / floor: {ratio:.1f}x (target <= {RATIO_TARGET:g}x): "
            f"{verdict(ratio <= RATIO_TARGET)}"
        )
        print(f"  features / read floor: {full['seconds'] / read['seconds']:.1f}x")
        peak = full["tree_peak"]
        print(
            f"  peak memory of the process tree: {peak / GIB:.2f} GiB (target <= 1 GiB): "
            f"{verdict(peak <= MEMORY_TARGET)}; largest single process "
            f"{max(full['self_peak'], full['worker_peak']) / GIB:.2f} GiB"
        )
        extra = work / "extra"
        tables = home / "pool" / "tables" / STUDY
        for sensor_dir in sorted(extra.iterdir()):
            for day in sensor_dir.iterdir():
                shutil.move(day, tables / sensor_dir.name / day.name)
        from workbench.config import load_config

        set_marks(load_config(home), 2)
        more = measure(home, "incremental", args.processes)
        print(
            f"incremental after day {args.days + 1} for every subject:  {more['seconds']:7.2f} s  "
            f"({more['recomputed']} subjects recomputed, {more['rows']:,} subject-days) = "
            f"{more['seconds'] / full['seconds']:.2f} of the full run"
        )
        print(f"  peak memory of the process tree: {more['tree_peak'] / GIB:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
