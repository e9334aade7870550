"""Location features per local day (Saeb et al. 2015; Doryab et al. 2019 as in RAPIDS).

Fixes worse than an accuracy limit are dropped, and so is an isolated jump: a fix reached from
the previous fix and left for the next one faster than ``max_speed_kmh``. Each fix stands for
the time until the next fix, at most ``max_fix_minutes`` (see :mod:`timeline`). A fix is moving
when its step to the next fix is faster than ``static_speed_kmh``; the stationary fixes of all
of a subject's days are clustered with DBSCAN (haversine, ``eps_m``, ``min_samples``) into
places. Home is the place with the most time between ``night_start_hour`` and
``night_end_hour`` local time over all the subject's days in the input.

Coordinates outside the valid ranges (JTrack's on-phone rotation) are kept, never rejected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import polars as pl

from workbench.features.family import (
    FamilyResult,
    Feature,
    FeatureFamily,
    Frames,
    count_nulls,
    empty_table,
    sensor_frame,
)
from workbench.features.timeline import spans

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)
NO_PLACE = -1
GRID_DEGREES = 1e-4


@dataclass(frozen=True)
class LocationParams:
    """Parameters of the location features."""

    max_accuracy_m: float = 100.0
    max_speed_kmh: float = 250.0
    static_speed_kmh: float = 1.0
    eps_m: float = 100.0
    min_samples: int = 5
    interval_minutes: float = 10.0
    max_fix_minutes: float = 20.0
    night_start_hour: int = 0
    night_end_hour: int = 6


FEATURES = (
    Feature("location_places", pl.Int64, "count", "Distinct places visited (stays at a place)."),
    Feature("location_home_minutes", pl.Float64, "min", "Time at home."),
    Feature("location_max_from_home_km", pl.Float64, "km", "Largest distance of a fix from home."),
    Feature("location_distance_km", pl.Float64, "km", "Distance travelled between fixes."),
    Feature("location_radius_gyration_km", pl.Float64, "km", "Time-weighted radius of gyration."),
    Feature("location_entropy", pl.Float64, "nat", "Entropy of the time spent at places."),
    Feature(
        "location_normalized_entropy", pl.Float64, "1", "Entropy over ln(number of places), 0..1."
    ),
    Feature("location_moving_minutes", pl.Float64, "min", "Time moving (not at a stay)."),
)


def haversine_km(lat1: pl.Expr, lon1: pl.Expr, lat2: pl.Expr, lon2: pl.Expr) -> pl.Expr:
    """Great-circle distance in km between two points given in degrees (any range)."""
    p1, p2 = lat1.radians(), lat2.radians()
    a = ((p2 - p1) / 2).sin() ** 2 + p1.cos() * p2.cos() * ((lon2 - lon1).radians() / 2).sin() ** 2
    return 2 * EARTH_RADIUS_KM * a.clip(0.0, 1.0).sqrt().arcsin()


def _steps(fixes: pl.DataFrame) -> pl.DataFrame:
    """Each fix with the step to the next fix of its subject: km, minutes and km/h."""
    nxt = {c: pl.col(c).shift(-1).over("subject") for c in ("lat", "lon", "time")}
    km = haversine_km(pl.col("lat"), pl.col("lon"), nxt["lat"], nxt["lon"])
    minutes = (nxt["time"] - pl.col("time")).dt.total_milliseconds() / 60_000
    return (
        fixes.sort("subject", "time")
        .with_columns(step_km=km, step_minutes=minutes)
        .with_columns(step_kmh=_speed(pl.col("step_km"), pl.col("step_minutes")))
    )


def _speed(km: pl.Expr, minutes: pl.Expr) -> pl.Expr:
    return pl.when(km == 0).then(0.0).otherwise(km / (minutes / 60))


def usable_fixes(frame: pl.DataFrame, params: LocationParams) -> pl.DataFrame:
    """Fixes within the accuracy limit, without isolated jumps faster than the speed limit."""
    fixes = _steps(frame.filter(pl.col("accuracy") <= params.max_accuracy_m))
    fast_out = pl.col("step_kmh") > params.max_speed_kmh
    fast_in = fast_out.shift(1).over("subject")
    fixes = fixes.filter(~(fast_in.fill_null(False) & fast_out.fill_null(False)))
    return _steps(fixes.drop("step_km", "step_minutes", "step_kmh"))


def _places(fixes: pl.DataFrame, params: LocationParams) -> pl.DataFrame:
    """``fixes`` with ``moving`` and ``place`` (DBSCAN label per subject, -1 for none)."""
    near = pl.col("step_minutes") <= params.max_fix_minutes
    speed_in = pl.col("step_kmh").shift(1).over("subject")
    near_in = near.shift(1).over("subject").fill_null(False)
    speed = pl.when(near).then("step_kmh").when(near_in).then(speed_in).otherwise(0.0)
    fixes = fixes.with_columns(moving=speed > params.static_speed_kmh)
    parts = []
    for part in fixes.partition_by("subject", maintain_order=True):
        parts.append(part.with_columns(place=pl.Series(_cluster(part, params), dtype=pl.Int64)))
    return pl.concat(parts)


def _cluster(part: pl.DataFrame, params: LocationParams) -> np.ndarray:
    """DBSCAN labels of one subject's fixes (-1 for moving fixes and noise).

    Stationary fixes are first pooled on a grid of ``GRID_DEGREES`` (about 11 m), each cell
    weighted by its fixes: the same clusters, without a subject's thousands of fixes at home
    all being neighbours of each other.
    """
    from sklearn.cluster import DBSCAN

    labels = np.full(part.height, NO_PLACE, dtype=np.int64)
    still = ~part.get_column("moving").to_numpy()
    if still.sum() < params.min_samples:
        return labels
    cells = np.round(part.select("lat", "lon").to_numpy()[still] / GRID_DEGREES).astype(np.int64)
    unique, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
    model = DBSCAN(
        eps=params.eps_m / 1000 / EARTH_RADIUS_KM,
        min_samples=params.min_samples,
        metric="haversine",
        algorithm="ball_tree",
    )
    cell_labels = model.fit(np.radians(unique * GRID_DEGREES), sample_weight=counts).labels_
    labels[still] = cell_labels[inverse.ravel()]
    return labels


def _homes(pieces: pl.DataFrame, fixes: pl.DataFrame, params: LocationParams) -> pl.DataFrame:
    """Per subject: the home place and its centre (mean of its fixes)."""
    base = pl.col("day").cast(pl.Datetime("ms"))
    night_from = base + pl.duration(hours=params.night_start_hour)
    night_to = base + pl.duration(hours=params.night_end_hour)
    overlap = pl.min_horizontal("end", night_to) - pl.max_horizontal("start", night_from)
    night = (
        pieces.filter(pl.col("place") != NO_PLACE)
        .with_columns(night=(overlap.dt.total_milliseconds() / 60_000).clip(lower_bound=0))
        .group_by("subject", "place")
        .agg(pl.col("night").sum())
        .filter(pl.col("night") > 0)
        .sort("subject", "night", "place", descending=[False, True, False])
        .group_by("subject", maintain_order=True)
        .first()
        .select("subject", home="place")
    )
    centres = fixes.group_by("subject", "place").agg(
        home_lat=pl.col("lat").mean(), home_lon=pl.col("lon").mean()
    )
    return night.join(centres, left_on=["subject", "home"], right_on=["subject", "place"])


def _day_features(pieces: pl.DataFrame, fixes: pl.DataFrame, params: LocationParams):
    at_place = pl.col("place") != NO_PLACE
    place_minutes = (
        pieces.filter(at_place)
        .group_by("subject", "day", "place")
        .agg(pl.col("minutes").sum())
        .filter(pl.col("minutes") > 0)
        .with_columns(p=pl.col("minutes") / pl.col("minutes").sum().over("subject", "day"))
        .group_by("subject", "day")
        .agg(
            location_places=pl.len(),
            location_entropy=-(pl.col("p") * pl.col("p").log()).sum(),
        )
        .with_columns(
            location_normalized_entropy=pl.when(pl.col("location_places") > 1)
            .then(pl.col("location_entropy") / pl.col("location_places").log())
            .otherwise(0.0)
        )
    )
    w = pl.col("minutes")
    gyration = (
        pieces.filter(w > 0)
        .with_columns(
            c_lat=(pl.col("lat") * w).sum().over("subject", "day") / w.sum().over("subject", "day"),
            c_lon=(pl.col("lon") * w).sum().over("subject", "day") / w.sum().over("subject", "day"),
        )
        .with_columns(
            d=haversine_km(pl.col("lat"), pl.col("lon"), pl.col("c_lat"), pl.col("c_lon"))
        )
        .group_by("subject", "day")
        .agg(
            location_radius_gyration_km=((w * pl.col("d") ** 2).sum() / w.sum()).sqrt(),
            location_moving_minutes=w.filter(pl.col("moving")).sum(),
            _home=w.filter(pl.col("place") == pl.col("home")).sum(),
            _has_home=pl.col("home").is_not_null().any(),
        )
        .with_columns(location_home_minutes=pl.when("_has_home").then("_home").otherwise(None))
        .drop("_home", "_has_home")
    )
    counted = (pl.col("step_minutes") <= params.max_fix_minutes) & (
        pl.col("step_kmh") <= params.max_speed_kmh
    )
    # a step slower than the stationary threshold is GPS jitter at a stay, not travel
    travel = pl.when(pl.col("step_kmh") > params.static_speed_kmh).then("step_km").otherwise(0.0)
    distance = (
        fixes.filter(counted).group_by("subject", "day").agg(location_distance_km=travel.sum())
    )
    from_home = fixes.group_by("subject", "day").agg(
        location_max_from_home_km=haversine_km(
            pl.col("lat"), pl.col("lon"), pl.col("home_lat"), pl.col("home_lon")
        ).max()
    )
    return place_minutes, gyration, distance, from_home


def compute(frames: Frames, params: LocationParams) -> FamilyResult:
    """Location features per subject and local day."""
    columns = ["subject", "time", "local_time", "day", "lat", "lon", "accuracy"]
    frame = sensor_frame(frames, "location", columns)
    if frame is None:
        return FamilyResult(empty_table(FEATURES))
    days = frame.select("subject", "day").unique()
    fixes = _places(usable_fixes(frame, params), params)
    pieces = spans(fixes, cap_minutes=params.max_fix_minutes, last_minutes=params.interval_minutes)
    homes = _homes(pieces, fixes, params)
    fixes = fixes.join(homes, on="subject", how="left")
    pieces = pieces.join(homes.select("subject", "home"), on="subject", how="left")
    table = days
    for part in _day_features(pieces, fixes, params):
        table = table.join(part, on=["subject", "day"], how="left")
    usable = fixes.select("subject", "day").unique()
    table = table.join(usable.with_columns(_usable=pl.lit(True)), on=["subject", "day"], how="left")
    table = table.with_columns(
        location_places=pl.when("_usable").then(pl.col("location_places").fill_null(0))
    )
    reasons = Counter()
    unusable = table.get_column("_usable").null_count()
    if unusable:
        reasons["location (all features): no fix within the accuracy and speed limits"] = unusable
    kept = table.filter(pl.col("_usable").is_not_null())
    reasons += count_nulls(
        kept,
        {
            "location_home_minutes": "no home (no place occupied at night)",
            "location_max_from_home_km": "no home (no place occupied at night)",
            "location_distance_km": f"no two fixes within {params.max_fix_minutes:g} minutes",
            "location_radius_gyration_km": "no time covered by a fix",
            "location_moving_minutes": "no time covered by a fix",
            "location_entropy": "no time at a place",
            "location_normalized_entropy": "no time at a place",
        },
    )
    return FamilyResult(table, reasons)


FAMILY = FeatureFamily(
    name="location",
    sensors=("location",),
    params=LocationParams,
    features=FEATURES,
    compute_table=compute,
    description="Places, home, distance and mobility from location fixes.",
)
