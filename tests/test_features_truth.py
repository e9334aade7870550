"""Features computed from simulated days agree with the truth the simulation kept.

The simulator draws each subject's days minute by minute and derives both the records the app
uploads and the truth (places, minutes at home, km travelled, minutes per activity, app
minutes, EMA answers, labelled minutes), so the features computed from the stored batches
through the sensor tables can be compared with what happened. Agreement figures are printed
(run with ``-s``).
"""

from __future__ import annotations

import datetime

import polars as pl
import pytest

from workbench.catalog import open_catalog
from workbench.config import init_home
from workbench.features import task_minutes
from workbench.features.build import compute_features
from workbench.sensors.loading import sensor_data
from workbench.sensors.tables import build_tables
from workbench.simulators.days import APPS, SENSORS, _slug, simulate_days
from workbench.studies import create_study, definition_from_options

pytestmark = pytest.mark.slow

START = datetime.date(2024, 3, 4)  # a Monday: five weekdays and a weekend
DAYS, SUBJECTS, SEED = 7, 3, 11
KEYS = ["subject", "day"]


def _simulated(tmp_path_factory, *, obfuscate: bool):
    config = init_home(tmp_path_factory.mktemp("truth") / "home")
    catalog = open_catalog(config)
    definition = definition_from_options("demo", duration_days=DAYS, sensors=list(SENSORS))
    create_study(
        catalog, {**definition, "timezone": "Europe/Berlin", "tasks": ["walking", "commuting"]}
    )
    catalog.dispose()
    truth = simulate_days(
        config, "demo", subjects=SUBJECTS, days=DAYS, seed=SEED, start=START, obfuscate=obfuscate
    )
    assert truth.failed == 0
    build_tables(config, "demo", processes=1)
    result = compute_features(config, "demo", processes=1)
    joined = truth.days.join(result.table, on=KEYS, how="left", suffix="_feature")
    return config, truth, result, joined


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Three subjects' week with true coordinates, and their features."""
    return _simulated(tmp_path_factory, obfuscate=False)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """The same week with coordinates rotated on the phone, as JTrack does."""
    return _simulated(tmp_path_factory, obfuscate=True)


def _full(joined: pl.DataFrame) -> pl.DataFrame:
    """Days the phone was on all day: every minute of the truth is observable."""
    return joined.filter(
        pl.col("phone_minutes") == pl.col("still_minutes") + pl.col("moving_minutes")
    )


def _mae(a: pl.Series, b: pl.Series) -> float:
    return float((a.cast(pl.Float64) - b.cast(pl.Float64)).abs().mean())


def test_every_simulated_day_has_a_row_and_thin_days_are_not_valid(plain):
    _config, truth, result, joined = plain
    assert joined.height == SUBJECTS * DAYS
    assert joined.get_column("valid_day").null_count() == 0  # every true day has a row
    full = _full(joined)
    assert full.height >= SUBJECTS * DAYS // 2
    assert full.get_column("valid_day").all()
    thin = joined.filter(pl.col("phone_minutes") <= 12 * 60)
    assert not thin.get_column("valid_day").any()
    print(f"\n  {full.height} of {joined.height} subject-days with the phone on all day; "
          f"{joined['valid_day'].sum()} valid days (>= 16 valid hours)")  # fmt: skip


def test_places_home_and_distance_agree_with_the_truth(plain):
    full = _full(plain[3])
    places_exact = (full["location_places"] == full["places"]).mean()
    home_mae = _mae(full["location_home_minutes"], full["home_minutes"])
    moved = full.filter(pl.col("travelled_km") > 0)
    ratio = moved["location_distance_km"] / moved["travelled_km"]
    print(f"\n  places: exact on {places_exact:.0%} of full days, MAE "
          f"{_mae(full['location_places'], full['places']):.2f}")  # fmt: skip
    print(f"  home minutes: MAE {home_mae:.1f} min (truth mean {full['home_minutes'].mean():.0f})")
    print(f"  distance: MAE {_mae(full['location_distance_km'], full['travelled_km']):.2f} km, "
          f"computed/true median {ratio.median():.2f}, range {ratio.min():.2f}-{ratio.max():.2f}")  # fmt: skip
    assert places_exact >= 0.75
    assert home_mae <= 30
    assert ((full["location_home_minutes"] - full["home_minutes"]).abs() <= 90).all()
    # Fixes every 10 minutes cut the corners of a trip (a 12-minute ride seen by one fix
    # is a chord, not the road) and a trip between two fixes may be seen only in part; the
    # GPS scatter of a stay is not travel: 0 km on a day at home, within 40 % + 0.5 km else
    error = (full["location_distance_km"] - full["travelled_km"]).abs()
    assert (error <= 0.4 * full["travelled_km"] + 0.5).all()
    assert 0.8 <= ratio.median() <= 1.1
    assert (full.filter(pl.col("travelled_km") == 0)["location_distance_km"] == 0).all()


def test_activity_minutes_agree_with_the_truth(plain):
    full = _full(plain[3])
    for mode in ("walking", "vehicle"):
        computed, true = full[f"activity_{mode}_minutes"], full[f"{mode}_minutes"]
        error = (computed - true).abs()
        print(f"\n  {mode} minutes: MAE {error.mean():.1f}, largest error {error.max():.1f} "
              f"(truth mean {true.mean():.0f})")  # fmt: skip
        # a detection every 5 minutes lasts 5 minutes: each bout (a walk to the bus, a ride)
        # is off by up to a detection at either end
        assert error.mean() <= 5, mode
        assert (error <= 15 + 0.2 * true).all(), mode
    # Detections come every 5 minutes give or take the seconds of a minute, and one lasts at
    # most 5 minutes: a gap of 5.5 minutes loses half a minute, about 3 % of a still day
    still = full["activity_still_minutes"] / full["still_minutes"]
    print(f"  still minutes: computed/true {still.min():.3f}-{still.max():.3f}")
    assert ((still >= 0.94) & (still <= 1.0)).all()


def test_app_minutes_agree_per_app_and_in_total(plain):
    config, _truth, _result, joined = plain
    full = _full(joined)
    assert (full["app_minutes_total_feature"] == full["app_minutes_total"]).all()
    apps = workbench_app_usage(config)
    for app in APPS:
        column = f"app_minutes_{_slug(app)}"
        mine = apps.filter(pl.col("app") == app).select(*KEYS, computed="minutes")
        both = full.select(*KEYS, column).join(mine, on=KEYS, how="left")
        assert (both["computed"].fill_null(0.0) == both[column]).all(), app
    mae = _mae(joined["app_minutes_total_feature"].fill_null(0), joined["app_minutes_total"])
    print(f"\n  app minutes: exact per app and in total on full days; MAE over all days {mae:.2f}")


def workbench_app_usage(config) -> pl.DataFrame:
    import workbench

    return workbench.app_usage(config, "demo")


def test_ema_prompts_and_labelled_minutes_agree_with_the_truth(plain):
    config, _truth, _result, joined = plain
    answered = joined["ema_prompts_answered"].fill_null(0)
    assert (answered == joined["ema_answered"]).all()
    assert (
        joined.filter(pl.col("ema_answered") == 0)["ema_prompts_answered"].null_count()
        == (joined["ema_answered"] == 0).sum()
    )  # no answer that day: null, not zero
    labelled = joined["labelled_minutes_walking"] + joined["labelled_minutes_commuting"]
    assert (joined["labels_minutes_total"].fill_null(0.0) == labelled).all()
    tasks = task_minutes({"active_labeling": sensor_data(config, "demo", "active_labeling")})
    import workbench

    assert workbench.labelled_minutes(config, "demo").equals(tasks)  # the public per-task table
    for task in ("walking", "commuting"):
        mine = tasks.filter(pl.col("task") == task).select(*KEYS, computed="minutes")
        both = joined.select(*KEYS, f"labelled_minutes_{task}").join(mine, on=KEYS, how="left")
        assert (both["computed"].fill_null(0.0) == both[f"labelled_minutes_{task}"]).all()
    print(f"\n  EMA prompts answered: exact on {joined.height} days; labelled minutes: exact "
          f"({labelled.sum()} min over {(labelled > 0).sum()} days)")  # fmt: skip


def test_rotation_keeps_places_home_and_entropy_but_not_distances(plain, rotated):
    columns = [*KEYS, "location_places", "location_home_minutes", "location_entropy",
               "location_distance_km", "location_radius_gyration_km"]  # fmt: skip
    a = plain[2].table.select(columns)
    b = rotated[2].table.select(columns)
    both = a.join(b, on=KEYS, suffix="_rotated")
    assert both.height == a.height == b.height
    places = (both["location_places"] == both["location_places_rotated"]).mean()
    home = _mae(both["location_home_minutes"], both["location_home_minutes_rotated"])
    entropy = _mae(both["location_entropy"], both["location_entropy_rotated"])
    ratio = both["location_distance_km_rotated"] / both["location_distance_km"]
    print(f"\n  rotated vs true coordinates: places equal on {places:.0%} of days, home minutes "
          f"MAE {home:.1f}, entropy MAE {entropy:.3f}, distance ratio "
          f"{ratio.min():.2f}-{ratio.max():.2f}")  # fmt: skip
    assert places >= 0.9 and home <= 15 and entropy <= 0.1
    assert ((ratio - 1).abs() > 0.02).mean() >= 0.5  # lengths are distorted
