"""Behavioural features per subject and local day, one module per family, registered by name.

    location       places, home, distance, radius of gyration, entropy (location)
    activity       minutes per detected activity type, transitions (activity)
    app_usage      foreground minutes, apps used, entropy (application_usage)
    accelerometer  magnitude mean and SD, active minutes (accelerometer)
    gyroscope      magnitude mean and SD (gyroscope)
    ema            prompts and questions answered (ema)
    labels         labelled minutes and labels (active_labeling)

Each family turns the sensor tables it needs into one row per subject and local day; a feature
that cannot be computed is null and its reason counted. Formulas and citations: docs/features.md.

The package itself is callable: ``workbench.features(config, study, ...)`` is
:func:`workbench.features.build.features`, the day table of every family with the day's yield.

Example::

    table = workbench.features(config, "demo")   # one row per subject and local day
    result = compute_family("activity", {"activity": table})
    result.table      # subject, day, activity_still_minutes, ...
    result.reasons    # Counter of "feature: reason" -> subject-days
"""

from __future__ import annotations

import sys
import types
from typing import Any

from workbench.errors import UnknownFeatureFamily
from workbench.features import activity, app_usage, ema, labels, location, motion
from workbench.features.app_usage import app_minutes
from workbench.features.family import (
    FamilyResult,
    Feature,
    FeatureFamily,
    Frames,
)
from workbench.features.labels import task_minutes

__all__ = [
    "FamilyResult",
    "Feature",
    "FeatureFamily",
    "app_minutes",
    "compute_family",
    "family",
    "list_families",
    "register",
    "task_minutes",
]

_FAMILIES: dict[str, FeatureFamily] = {}


def register(entry: FeatureFamily) -> None:
    """Add a feature family to the registry under its name (a later one replaces it)."""
    _FAMILIES[entry.name] = entry


def family(name: str) -> FeatureFamily:
    """The registered family ``name``; :class:`UnknownFeatureFamily` when there is none."""
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(_FAMILIES)
        raise UnknownFeatureFamily(f"no feature family {name!r} (known: {known})") from None


def list_families() -> list[str]:
    """The registered families' names, in the order of the day table's columns."""
    return list(_FAMILIES)


def compute_family(name: str, frames: Frames, params: Any = None) -> FamilyResult:
    """One family's day table and null reasons from sensor tables keyed by sensor name."""
    return family(name).compute(frames, params)


for _entry in (
    location.FAMILY,
    activity.FAMILY,
    app_usage.FAMILY,
    motion.ACCELEROMETER_FAMILY,
    motion.GYROSCOPE_FAMILY,
    ema.FAMILY,
    labels.FAMILY,
):
    register(_entry)


class _CallableModule(types.ModuleType):
    """This package, callable as :func:`workbench.features.build.features`."""

    def __call__(self, config, study, **options):
        """One row per subject and local day (see :func:`workbench.features.build.features`)."""
        from workbench.features.build import features

        return features(config, study, **options)


sys.modules[__name__].__class__ = _CallableModule
