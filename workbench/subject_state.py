"""The names of a subject's state, defined once for status, alerts, dashboards and reports.

Three levels, each with its own names, and only these:

- :class:`DeviceStatus`: what a device reported (JTrack's ``status_code``): active, left
  (at the phone's or the server's time) or removed by the study team;
- :class:`Activity`: what the status table says of a device row (``activity_code``, JTrack's
  dashboard codes 0-4, and 5 when none applies);
- :class:`SubjectState`: one state per subject, as the status dashboard counts them, and
  :class:`Disposition`, a subject's outcome as the attrition report counts it (CONSORT).

Code compares with the members (``Activity.NO_DATA``), never with bare numbers or strings.

Example::

    from workbench.subject_state import Activity
    table.filter(pl.col("activity_code") == Activity.NO_DATA)
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class DeviceStatus(IntEnum):
    """A device's ``status_code`` (JTrack's)."""

    ACTIVE = 0
    LEFT_CLIENT_TIME = 1  # the subject ended the study in the app (the phone's time)
    LEFT_SERVER_TIME = 2  # the same, timed by the server
    REMOVED = 3  # removed by the study team


# A device with one of these codes takes no further part in the study.
LEFT_STATUSES = (DeviceStatus.LEFT_CLIENT_TIME, DeviceStatus.LEFT_SERVER_TIME, DeviceStatus.REMOVED)


class Activity(IntEnum):
    """A status row's ``activity_code``: JTrack's dashboard codes 0-4; 5 when none applies."""

    NO_DATA = 0
    LEFT_EARLY = 1
    OVER_NOT_LEFT = 2
    COMPLETED = 3
    SEVERAL_DEVICES = 4
    OK = 5

    @property
    def label(self) -> str:
        """The words shown for the code (the status table's ``activity`` column)."""
        return _LABELS[self]


_LABELS = {
    Activity.NO_DATA: "no data",
    Activity.LEFT_EARLY: "left early",
    Activity.OVER_NOT_LEFT: "duration over, not left",
    Activity.COMPLETED: "completed",
    Activity.SEVERAL_DEVICES: "several devices active",
    Activity.OK: "ok",
}
# code -> words, for polars' replace_strict
ACTIVITY_LABELS = {int(code): code.label for code in Activity}


class SubjectState(StrEnum):
    """A subject's state on the status dashboard, in the order "who needs attention" sorts."""

    STALE = "stale"
    NEVER_STARTED = "never started"
    ACTIVE = "active"
    LEFT = "left"
    COMPLETED = "completed"


class Disposition(StrEnum):
    """A participant's outcome in the attrition report, in the CONSORT funnel's order."""

    ACTIVE = "active"
    COMPLETED = "completed"
    WITHDRAWN = "withdrawn"
    LOST = "lost to follow-up"
    NOT_STARTED = "not started"


# Dispositions that are a dropout (an event for Kaplan-Meier).
DROPPED = (Disposition.WITHDRAWN, Disposition.LOST)
