"""Simulated days of JTrack data whose truth is known.

Each subject lives in one city: a home, a workplace and a few other places. First a timeline
is drawn, minute by minute from local midnight of the first day: where the subject is, how
they move, whether the phone is on, which app is in the foreground, which task they label.
Both the records the app would upload and the truth per local day are derived from that one
timeline, so the truth is exact by construction::

    timeline ─┬─> records: location every 10 min, activity every 5 min, accelerometer and
              │   gyroscope at 5 Hz while moving and for 30 min after, hourly app-usage
              │   snapshots, EMA answers, active labels ─> batches cut as the app cuts them
              └─> truth: places, minutes at home, km travelled and walked, minutes per
                  activity, app minutes, EMA answers, labelled minutes, hours with data

Coordinates are obfuscated as the app does (a fixed per-device rotation in degree space about
a random anchor, the true latitude left in ``alt``) unless ``obfuscate=False``.

Example::

    truth = simulate_days(config, "demo", subjects=5, days=7, seed=1)
    truth.days.filter(pl.col("subject") == "demo_00001")
"""

from __future__ import annotations

import datetime
import math
import random
import time
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import polars as pl
from tqdm import tqdm

from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.sensors.schemas import sensor_schema
from workbench.simulators.phones import HttpPhones, IngestPhones, check_server

# Google's DetectedActivity codes, as the app sends them.
VEHICLE, BICYCLE, ON_FOOT, STILL, WALKING, RUNNING = 0, 1, 2, 3, 7, 8
MODES = {STILL: "still", WALKING: "walking", RUNNING: "running", BICYCLE: "bicycle", VEHICLE: "vehicle"}  # fmt: skip
SPEED_KMH = {WALKING: 5.0, RUNNING: 10.0, BICYCLE: 15.0, VEHICLE: 30.0}
DETOUR = 1.3  # a trip's time allows for streets that are not straight lines

SENSORS = ("accelerometer", "gyroscope", "location", "activity", "application_usage", "ema",
           "active_labeling")  # the sensors simulated; a study gets those it records  # fmt: skip
APPS = ("WhatsApp", "Chrome", "Instagram", "Gmail", "Spotify", "YouTube")
DEFAULT_TASKS = ("walking", "commuting")
HOME, WORK = 0, 1
OTHER_PLACES = (("shop", 0.3, 1.5), ("cafe", 0.5, 3.0), ("gym", 1.0, 4.0), ("friend", 2.0, 8.0))
CITY_CENTRES = {  # a city in the study's zone when we know one; Cologne otherwise
    "Europe/Berlin": (52.5200, 13.4050),
    "Europe/London": (51.5072, -0.1276),
    "America/New_York": (40.7128, -74.0060),
    "America/Los_Angeles": (34.0522, -118.2437),
    "Asia/Tokyo": (35.6762, 139.6503),
}
DEFAULT_CENTRE = (50.9375, 6.9603)

SAMPLES_PER_MINUTE = 300  # accelerometer and gyroscope at 5 Hz
RECORDING_TAIL = 30  # minutes the motion sensors go on recording after movement stops
LOCATION_EVERY, ACTIVITY_EVERY = 10, 5  # minutes
EMA_PROMPTS = (9 * 60, 13 * 60, 19 * 60)  # minutes after local midnight
EMA_QUESTIONS = 3
PARTIAL_AFTER_MS = 24 * 3_600_000  # the app sends a batch that is not full after a day
EARTH_KM = 6371.0088


@dataclass(frozen=True)
class Place:
    """A place a subject stays at."""

    kind: str
    lat: float
    lon: float


@dataclass
class Profile:
    """Who a simulated subject is: where they live, work and go, how they move, which apps
    they use, and the rotation key of their phone."""

    subject: str
    device: str
    zone: str
    places: list[Place]
    commute: int  # activity code of the way to work
    cyclist: bool
    runner: bool
    app_weights: list[float]
    rotation: tuple[float, float, float]  # anchor latitude, anchor longitude, degrees
    phase: int  # minute offset of the location and activity schedules


@dataclass
class Timeline:
    """A subject's minutes from local midnight of the first day: what every record and the
    truth come from. ``day_starts`` holds the minute of each local midnight and of the end."""

    start_ms: int
    dates: list[datetime.date]
    day_starts: list[int]
    place: np.ndarray  # index into the profile's places; -1 while travelling
    mode: np.ndarray  # activity code
    lat: np.ndarray  # true position
    lon: np.ndarray
    phone: np.ndarray  # the phone is on
    awake: np.ndarray
    app: np.ndarray  # index into APPS of the app in the foreground; -1 for none
    task: np.ndarray  # index of the labelled task; -1 for none
    labels: list[tuple[int, int, int]] = field(default_factory=list)  # task, start, end
    prompts: list[tuple[int, int | None]] = field(default_factory=list)  # minute, answered

    @classmethod
    def empty(cls, start: datetime.date, days: int, zone: str) -> Timeline:
        """A timeline of ``days`` local days from ``start`` in ``zone``: at home, still."""
        dates = [start + datetime.timedelta(days=d) for d in range(days + 1)]
        midnights = [local_midnight_ms(date, zone) for date in dates]
        starts = [(ms - midnights[0]) // 60_000 for ms in midnights]
        n = starts[-1]
        return cls(
            start_ms=midnights[0],
            dates=dates[:-1],
            day_starts=starts,
            place=np.full(n, HOME, np.int16),
            mode=np.full(n, STILL, np.int8),
            lat=np.zeros(n),
            lon=np.zeros(n),
            phone=np.ones(n, bool),
            awake=np.zeros(n, bool),
            app=np.full(n, -1, np.int8),
            task=np.full(n, -1, np.int8),
        )

    def ms(self, minute: int) -> int:
        """Epoch milliseconds of the start of ``minute``."""
        return self.start_ms + minute * 60_000

    def days(self) -> Iterator[tuple[datetime.date, int, int]]:
        """Each local day with its first minute and the minute after its last."""
        for d, date in enumerate(self.dates):
            yield date, self.day_starts[d], self.day_starts[d + 1]


@dataclass(frozen=True)
class Batch:
    """One upload body as the app would send it."""

    sensor: str
    body: bytes
    records: int
    first_ts: int
    last_ts: int


@dataclass
class SubjectDays:
    """One simulated subject: who, what happened, the batches the phone sends and the truth."""

    profile: Profile
    timeline: Timeline
    batches: list[Batch]  # in the order the phone sends them
    truth: pl.DataFrame  # one row per local day


@dataclass
class SimulationTruth:
    """What a simulation did, per subject and local day (``days``) and per subject (``homes``),
    with counts of what was sent and stored."""

    days: pl.DataFrame
    homes: pl.DataFrame
    batches: int = 0
    records: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> pl.DataFrame:
        """The days with each subject's true home coordinates (``home_lat``, ``home_lon``)."""
        homes = self.homes.select("subject", home_lat="lat", home_lon="lon")
        return self.days.join(homes, on="subject", how="left")

    def write(self, path: Path) -> Path:
        """Write :meth:`table` to a Parquet file."""
        from workbench.writers import write_parquet_atomically

        return write_parquet_atomically(self.table(), Path(path))

    def summary(self) -> str:
        subjects = self.homes.height
        days = self.days.height // subjects if subjects else 0
        return (
            f"{subjects} subjects x {days} days: {self.batches} batches of {self.records} records "
            f"sent in {self.seconds:.1f} s, {self.stored} stored, {self.duplicates} already "
            f"stored, {self.failed} failed"
        )


# --------------------------------------------------------------------- geometry


def local_midnight_ms(date: datetime.date, zone: str) -> int:
    """Epoch milliseconds of the local midnight that starts ``date`` in ``zone``."""
    midnight = datetime.datetime.combine(date, datetime.time(), zoneinfo.ZoneInfo(zone))
    return int(midnight.timestamp() * 1000)


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km (works on numbers and numpy arrays)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(a))


def _km(a: Place, b: Place) -> float:
    return float(haversine_km(a.lat, a.lon, b.lat, b.lon))


def _offset(lat: float, lon: float, km: float, bearing: float) -> tuple[float, float]:
    """The point ``km`` from (lat, lon) towards ``bearing`` (radians), on a flat local map."""
    dlat = km * math.cos(bearing) / 111.32
    dlon = km * math.sin(bearing) / (111.32 * math.cos(math.radians(lat)))
    return lat + dlat, lon + dlon


def rotate(lat: float, lon: float, key: tuple[float, float, float]) -> tuple[float, float]:
    """JTrack's obfuscation: rotate (lat, lon) by ``degrees`` in degree space about the anchor,
    longitudes scaled by the anchor's latitude; results may leave the valid ranges."""
    lat0, lon0, degrees = key
    theta, scale = math.radians(degrees), abs(math.cos(math.radians(lat0)))
    new_lon = lon0 + math.cos(theta) * (lon - lon0) - math.sin(theta) * (lat - lat0) / scale
    new_lat = lat0 + math.sin(theta) * (lon - lon0) * scale + math.cos(theta) * (lat - lat0)
    return new_lat, new_lon


# --------------------------------------------------------------------- the timeline


def make_profile(subject: str, zone: str, rng: random.Random) -> Profile:
    """Draw a subject's places, habits and phone."""
    centre = CITY_CENTRES.get(zone, DEFAULT_CENTRE)
    home = _offset(*centre, rng.uniform(0.5, 5.0), rng.uniform(0, 2 * math.pi))
    work = _offset(*home, rng.uniform(1.5, 9.0), rng.uniform(0, 2 * math.pi))
    places = [Place("home", *home), Place("work", *work)]
    for kind, near, far in OTHER_PLACES:
        places.append(Place(kind, *_offset(*home, rng.uniform(near, far), rng.uniform(0, 6.3))))
    cyclist = rng.random() < 0.5
    km = _km(places[HOME], places[WORK])
    commute = WALKING if km < 2 else BICYCLE if km < 6 and cyclist else VEHICLE
    anchor = (rng.uniform(-89.0, 89.0), rng.uniform(-180.0, 180.0), float(rng.randint(1, 359)))
    return Profile(
        subject=subject,
        device=f"sim-{rng.getrandbits(48):012x}",
        zone=zone,
        places=places,
        commute=commute,
        cyclist=cyclist,
        runner=rng.random() < 0.3,
        app_weights=[rng.random() ** 2 for _ in APPS],
        rotation=anchor,
        phase=rng.randrange(LOCATION_EVERY),
    )


class _Day:
    """Writes one local day into the timeline: stays at places and trips between them."""

    def __init__(self, tl: Timeline, profile: Profile, rng: random.Random, begin: int, end: int):
        self.tl, self.profile, self.rng = tl, profile, rng
        self.begin, self.end, self.t, self.at = begin, end, begin, HOME

    def stay(self, until: int) -> None:
        """Stay at the current place until ``until`` minutes after midnight."""
        stop = min(self.begin + until, self.end)
        if stop > self.t:
            place = self.profile.places[self.at]
            span = slice(self.t, stop)
            self.tl.place[span], self.tl.mode[span] = self.at, STILL
            self.tl.lat[span], self.tl.lon[span] = place.lat, place.lon
            self.t = stop

    def go(self, dest: int, mode: int, *, task: int | None = None) -> None:
        """Travel from the current place to ``dest``."""
        a, b = self.profile.places[self.at], self.profile.places[dest]
        minutes = max(3, math.ceil(_km(a, b) * DETOUR / SPEED_KMH[mode] * 60))
        self._leg((a.lat, a.lon), (b.lat, b.lon), minutes, mode, task)
        self.at = dest

    def loop(self, mode: int, minutes: int, *, task: int | None = None) -> None:
        """Go out from the current place and come back the same way."""
        here = self.profile.places[self.at]
        half = minutes // 2
        turn = _offset(here.lat, here.lon, SPEED_KMH[mode] * half / 60, self.rng.uniform(0, 6.3))
        start = self.t
        self._leg((here.lat, here.lon), turn, half, mode, None)
        self._leg(turn, (here.lat, here.lon), minutes - half, mode, None)
        if task is not None:
            self.tl.labels.append((task, start, self.t))

    def _leg(self, a, b, minutes: int, mode: int, task: int | None) -> None:
        n = min(minutes, self.end - self.t)
        if n <= 0:
            return
        share = np.arange(1, n + 1) / minutes  # after the last minute: at b
        span = slice(self.t, self.t + n)
        self.tl.place[span], self.tl.mode[span] = -1, mode
        self.tl.lat[span] = a[0] + (b[0] - a[0]) * share
        self.tl.lon[span] = a[1] + (b[1] - a[1]) * share
        if task is not None:
            self.tl.labels.append((task, self.t, self.t + n))
        self.t += n


def _weekday(day: _Day, rng: random.Random, tasks: int) -> tuple[int, int]:
    """Home, commute, work (a walk at lunch), perhaps a shop, home, perhaps a walk; returns the
    minutes after midnight of waking and of going to bed."""
    p = day.profile
    wake = 6 * 60 + rng.randint(0, 75)
    day.stay(wake + rng.randint(40, 80))
    day.go(WORK, p.commute, task=(1 % tasks) if rng.random() < 0.2 else None)
    if rng.random() < 0.5:  # a walk at lunch
        day.stay(12 * 60 + rng.randint(0, 45))
        day.loop(WALKING, rng.randint(15, 35))
    day.stay(16 * 60 + 30 + rng.randint(0, 90))
    if rng.random() < 0.35:  # shopping on the way home
        day.go(2, p.commute)
        day.stay((day.t - day.begin) + rng.randint(15, 40))
    day.go(HOME, p.commute)
    if rng.random() < 0.4:
        day.stay(19 * 60 + rng.randint(0, 90))
        day.loop(WALKING, rng.randint(20, 50), task=0 if rng.random() < 0.5 else None)
    return wake, 22 * 60 + 30 + rng.randint(0, 60)


def _weekend(day: _Day, rng: random.Random, tasks: int) -> tuple[int, int]:
    """A late start, perhaps an outing to another place, a run or a walk; returns the minutes
    after midnight of waking and of going to bed."""
    p = day.profile
    wake = 8 * 60 + rng.randint(0, 120)
    day.stay(10 * 60 + 30 + rng.randint(0, 90))
    if rng.random() < 0.7:  # an outing
        dest = rng.randrange(2, len(p.places))
        km = _km(p.places[HOME], p.places[dest])
        mode = WALKING if km < 1.5 else BICYCLE if km < 4 and p.cyclist else VEHICLE
        day.go(dest, mode)
        day.stay((day.t - day.begin) + rng.randint(60, 180))
        day.go(HOME, mode)
    day.stay(17 * 60 + rng.randint(0, 90))
    if p.runner and rng.random() < 0.6:
        day.loop(RUNNING, rng.randint(25, 45))
    elif rng.random() < 0.5:
        day.loop(WALKING, rng.randint(30, 70), task=0 if rng.random() < 0.4 else None)
    return wake, 22 * 60 + 30 + rng.randint(0, 60)


def make_timeline(
    profile: Profile, start: datetime.date, days: int, rng: random.Random, *, tasks: int = 2
) -> Timeline:
    """Draw a subject's days minute by minute: movement, sleep, phone gaps, app sessions, EMA
    prompts and labels."""
    tl = Timeline.empty(start, days, profile.zone)
    for date, begin, end in tl.days():
        day = _Day(tl, profile, rng, begin, end)
        plan = _weekend if date.weekday() >= 5 else _weekday
        wake, bed = plan(day, rng, tasks)
        day.stay(end - begin)  # home for the night
        tl.awake[begin + wake : min(begin + bed, end)] = True
        _phone_gaps(tl, rng, begin, end)
        _app_sessions(tl, profile, rng, begin + wake, min(begin + bed, end) - 30)
        for at in EMA_PROMPTS:
            m = begin + at
            if m < end and tl.phone[m] and tl.awake[m]:
                answered = m + rng.randint(1, 20)
                kept = rng.random() < 0.8 and tl.phone[answered]
                tl.prompts.append((m, answered if kept else None))
    # a label is made in the app: only while the phone is on
    tl.labels = [(k, s, e) for k, s, e in tl.labels if tl.phone[s] and tl.phone[e - 1]]
    for k, s, e in tl.labels:
        tl.task[s:e] = k
    return tl


def _phone_gaps(tl: Timeline, rng: random.Random, begin: int, end: int) -> None:
    """Switch the phone off for some hours on some days; on a poor day, most of it."""
    length = end - begin
    if rng.random() < 0.08:  # a day of poor yield: on for a few hours only
        on = rng.randint(3, 6) * 60
        first = begin + rng.randint(6 * 60, length - on - 60)
        tl.phone[begin:end] = False
        tl.phone[first : first + on] = True
    elif rng.random() < 0.15:
        off = rng.randint(2, 8) * 60
        first = begin + rng.randint(0, length - off)
        tl.phone[first : first + off] = False


def _app_sessions(tl: Timeline, profile: Profile, rng: random.Random, first: int, last: int):
    """App sessions while awake, still or riding, with the phone on; never overlapping."""
    for _ in range(rng.randint(8, 20)):
        if last - first < 30:
            return
        s = rng.randint(first, last)
        e = min(s + rng.randint(1, 20), last)
        app = rng.choices(range(len(APPS)), weights=profile.app_weights)[0]
        span = slice(s, e)
        free = (tl.app[span] < 0) & tl.phone[span] & np.isin(tl.mode[span], (STILL, VEHICLE))
        tl.app[span] = np.where(free, app, tl.app[span])


# --------------------------------------------------------------------- records


# The fields of each sensor's records after the common ones, in the app's order.
FIELDS = {
    "location": ("timestamp", "lat", "lon", "alt", "accuracy", "provider"),
    "activity": ("timestamp", "activityType", "confidence"),
    "accelerometer": ("timestamp", "x", "y", "z"),
    "gyroscope": ("timestamp", "x", "y", "z"),
    "application_usage": ("timestamp", "appName", "beginTimeStamp", "endTimeStamp",
                          "lastTimeUsed", "totalTimeinForeground"),
    "ema": ("timestamp", "subjectId", "freeText", "questionId", "answerId", "surveyVersion",
            "databaseId", "startTime", "endTime", "answerText", "answer"),
    "active_labeling": ("timestamp", "taskName", "startTimestamp", "endTimestamp", "duration",
                        "voiceId"),
}  # fmt: skip
# Accelerometer per activity: amplitude (m/s²) and frequency (Hz) of the step rhythm, noise.
RHYTHM = {STILL: (0, 0, 0.03), WALKING: (2.5, 1.8, 0.6), RUNNING: (6, 2.6, 1.2),
          BICYCLE: (0.8, 1.2, 1.0), VEHICLE: (0.3, 0.5, 0.4)}  # fmt: skip


class _Records:
    """The rows (tuples in :data:`FIELDS` order) of one timeline's sensors, and how many
    records fell in each minute. Each sensor draws from a random stream of its own, so its
    records do not depend on which other sensors a study records."""

    def __init__(self, profile: Profile, tl: Timeline, seed: Sequence[int], *,
                 obfuscate: bool, tasks: Sequence[str]) -> None:  # fmt: skip
        self.profile, self.tl, self.seed, self.obfuscate, self.tasks = (
            profile, tl, list(seed), obfuscate, tasks)  # fmt: skip
        self.counts: dict[str, np.ndarray] = {}

    def _rng(self, sensor: str) -> np.random.Generator:
        return np.random.default_rng([*self.seed, SENSORS.index(sensor)])

    def _count(self, sensor: str, minutes, n: int = 1) -> None:
        counts = self.counts.setdefault(sensor, np.zeros(len(self.tl.mode), np.int64))
        np.add.at(counts, np.asarray(minutes, np.int64), n)

    def location(self) -> Iterator[tuple]:
        """A fix every 10 minutes with the phone's accuracy; now and then a bad one."""
        tl, rng = self.tl, self._rng("location")
        minutes = [m for m in range(self.profile.phase, len(tl.mode), LOCATION_EVERY)
                   if tl.phone[m]]  # fmt: skip
        self._count("location", minutes)
        for m in minutes:
            provider = str(rng.choice(["gps", "fused", "network"], p=[0.6, 0.3, 0.1]))
            accuracy = rng.uniform(
                *{"gps": (3, 15), "fused": (5, 30), "network": (20, 80)}[provider]
            )
            if rng.random() < 0.03:
                provider, accuracy = "network", rng.uniform(150, 1500)
            north, east = rng.normal(0, accuracy / 2, 2) / 1000
            lat, lon = _offset(float(tl.lat[m]), float(tl.lon[m]), math.hypot(north, east),
                               math.atan2(east, north))  # fmt: skip
            shown = rotate(lat, lon, self.profile.rotation) if self.obfuscate else (lat, lon)
            ts = tl.ms(m) + int(rng.integers(0, 60_000))
            yield ts, *shown, lat, round(accuracy, 1), provider  # alt: the app's defect

    def activity(self) -> Iterator[tuple]:
        """A detection every 5 minutes; walking and running also give ON_FOOT."""
        tl, rng = self.tl, self._rng("activity")
        for m in range(self.profile.phase % ACTIVITY_EVERY, len(tl.mode), ACTIVITY_EVERY):
            if tl.phone[m]:
                mode = int(tl.mode[m])
                codes = (ON_FOOT, mode) if mode in (WALKING, RUNNING) else (mode,)
                ts = tl.ms(m) + int(rng.integers(0, 60_000))
                self._count("activity", [m], len(codes))
                for code in codes:
                    yield ts, code, float(rng.integers(70, 101))

    def motion(self, sensor: str) -> Iterator[tuple]:
        """Accelerometer or gyroscope at 5 Hz while moving and for 30 minutes after."""
        tl, idx, rng = self.tl, np.arange(len(self.tl.mode)), self._rng(sensor)
        moved = np.maximum.accumulate(np.where(tl.mode != STILL, idx, -(10**9)))
        minutes = np.flatnonzero(tl.phone & (idx - moved <= RECORDING_TAIL))
        self._count(sensor, minutes, SAMPLES_PER_MINUTE)
        steps = np.arange(SAMPLES_PER_MINUTE)
        for block in np.array_split(minutes, max(1, len(minutes) // 60)):
            amp, freq, noise = (np.array([RHYTHM[int(c)][i] for c in tl.mode[block]])[:, None]
                                for i in range(3))  # fmt: skip
            shape = (len(block), SAMPLES_PER_MINUTE)
            if sensor == "accelerometer":
                wave = 9.81 + amp * np.sin(2 * np.pi * freq * (block[:, None] * 60 + steps * 0.2))
            else:
                wave, noise = np.zeros(shape), noise / 2
            x, y, z = (np.round(v + rng.normal(0, 1, shape) * noise, 5).ravel().tolist()
                       for v in (0, 0, wave))  # fmt: skip
            stamps = (tl.start_ms + block[:, None] * 60_000 + steps * 200).ravel().tolist()
            yield from zip(stamps, x, y, z, strict=True)

    def application_usage(self) -> Iterator[tuple]:
        """Hourly snapshots (at minute 59) per app used, cumulative from local midnight."""
        tl = self.tl
        for _date, begin, end in tl.days():
            app = tl.app[begin:end]
            for m in range(begin + 59, end, 60):
                if tl.phone[m]:
                    ts, before = tl.ms(m) + 30_000, app[: m - begin]
                    for k, name in enumerate(APPS):
                        used = np.flatnonzero(before == k)
                        if len(used):
                            self._count("application_usage", [m])
                            last = tl.ms(begin + int(used[-1]) + 1)
                            yield ts, name, tl.ms(begin), ts, last, len(used) * 60_000

    def ema(self) -> Iterator[list[tuple]]:
        """Per answered prompt, one row per question (the EMA app sends a prompt at once)."""
        tl, subject, rng = self.tl, self.profile.subject, self._rng("ema")
        for prompted, answered in tl.prompts:
            if answered is not None:
                self._count("ema", [answered], EMA_QUESTIONS)
                answers = rng.integers(1, 6, EMA_QUESTIONS).tolist()
                yield [(tl.ms(answered) + 5_000 * (q + 1), subject, "", q + 1, a, 1, 1,
                        str(tl.ms(prompted)), str(tl.ms(answered) + 20_000), str(a), None)
                       for q, a in enumerate(answers)]  # fmt: skip

    def active_labeling(self) -> Iterator[tuple]:
        """A record per label, made when the labelled activity ends."""
        tl, rng = self.tl, self._rng("active_labeling")
        for task, start, end in sorted(tl.labels, key=lambda label: label[1]):
            self._count("active_labeling", [min(end, len(tl.mode) - 1)])
            voice = f"voice_{int(rng.integers(2**32)):08x}" if rng.random() < 0.4 else None
            yield (tl.ms(end), self.tasks[task], tl.ms(start), tl.ms(end),
                   float((end - start) * 60), voice)  # fmt: skip


def cut_batches(rows: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    """Cut rows (timestamp first, in time order) as the app does: ``size`` to a batch, and a
    batch that has not filled a day after its first record goes out as it is."""
    pending: list[tuple] = []
    for row in rows:
        if pending and row[0] - pending[0][0] > PARTIAL_AFTER_MS:
            yield pending
            pending = []
        pending.append(row)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


def _batch(sensor: str, base: dict, rows: list[tuple]) -> Batch:
    names = FIELDS[sensor]
    records = [{**base, **dict(zip(names, row, strict=False))} for row in rows]
    return Batch(sensor, orjson.dumps(records), len(rows), rows[0][0], rows[-1][0])


# --------------------------------------------------------------------- truth


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _truth(profile: Profile, tl: Timeline, counts: dict[str, np.ndarray],
           sensors: Sequence[str], tasks: Sequence[str]) -> pl.DataFrame:  # fmt: skip
    """One row per local day, from the timeline (behaviour) and the record counts (data)."""
    tz = zoneinfo.ZoneInfo(profile.zone)
    step = haversine_km(tl.lat[:-1], tl.lon[:-1], tl.lat[1:], tl.lon[1:])  # into minute i+1
    rows = []
    for date, begin, end in tl.days():
        span = slice(begin, end)
        moves = step[max(begin - 1, 0) : end - 1] if begin else np.r_[0.0, step[: end - 1]]
        mode, app = tl.mode[span], tl.app[span]
        row = {
            **{"subject": profile.subject, "device": profile.device, "day": date},
            "zone": profile.zone,
            "places": len(set(tl.place[span].tolist()) - {-1}),
            "home_minutes": int((tl.place[span] == HOME).sum()),
            "travelled_km": float(moves.sum()),
            "walked_km": float(moves[mode == WALKING].sum()),
            "moving_minutes": int((mode != STILL).sum()),
        }
        for code, name in MODES.items():
            row[f"{name}_minutes"] = int((mode == code).sum())
        row["phone_minutes"] = int(tl.phone[span].sum())
        for k, name in enumerate(APPS):
            row[f"app_minutes_{_slug(name)}"] = int((app == k).sum())
        row["app_minutes_total"] = int((app >= 0).sum())
        prompts = [(p, a) for p, a in tl.prompts if begin <= p < end]
        row["ema_prompts"] = len(prompts)
        row["ema_answered"] = sum(a is not None for _p, a in prompts)
        for k, task in enumerate(tasks):
            row[f"labelled_minutes_{_slug(task)}"] = int((tl.task[span] == k).sum())
        for sensor in sensors:
            got = counts.get(sensor, np.zeros(0, np.int64))[span]
            row[f"records_{sensor}"] = int(got.sum())
            stamps = (tl.ms(begin + m) / 1000 for m in np.flatnonzero(got).tolist())
            row[f"hours_{sensor}"] = sorted(
                {datetime.datetime.fromtimestamp(t, tz).hour for t in stamps}
            )
        rows.append(row)
    return pl.DataFrame(rows).with_columns(
        pl.col(f"hours_{s}").cast(pl.List(pl.Int8)) for s in sensors
    )


# --------------------------------------------------------------------- planning and delivery


def plan_days(
    study_id: str,
    subjects: Sequence[str],
    *,
    days: int,
    start: datetime.date,
    timezone: str = "UTC",
    zones: Mapping[str, str] | None = None,
    sensors: Iterable[str] = SENSORS,
    tasks: Sequence[str] = DEFAULT_TASKS,
    seed: int = 0,
    obfuscate: bool = True,
) -> Iterator[SubjectDays]:
    """Simulate ``days`` local days from ``start`` for each subject, one at a time: the batches
    its phone sends (nothing is stored) and the truth.

    Example: ``next(plan_days("demo", ["demo_00001"], days=2, start=date(2024, 5, 6))).truth``.
    """
    wanted = [s for s in SENSORS if s in set(sensors)]
    tasks = tuple(tasks) or DEFAULT_TASKS
    for index, subject in enumerate(subjects):
        rng = random.Random(seed * 1_000_003 + index)
        zone = (zones or {}).get(subject, timezone)
        profile = make_profile(subject, zone, rng)
        tl = make_timeline(profile, start, days, rng, tasks=len(tasks))
        made = _Records(profile, tl, (seed, index), obfuscate=obfuscate, tasks=tasks)
        batches: list[Batch] = []
        for sensor in wanted:
            base = {"studyId": study_id, "username": subject, "deviceid": profile.device,
                    "sensorname": sensor}  # fmt: skip
            if sensor == "ema":  # the EMA app sends each answered prompt
                batches += [_batch(sensor, base, rows) for rows in made.ema()]
                continue
            motion = sensor in ("accelerometer", "gyroscope")
            rows = made.motion(sensor) if motion else getattr(made, sensor)()
            size = sensor_schema(sensor).batch_records
            batches += [_batch(sensor, base, chunk) for chunk in cut_batches(rows, size)]
        batches.sort(key=lambda b: (b.last_ts, b.sensor))
        yield SubjectDays(profile, tl, batches, _truth(profile, tl, made.counts, wanted, tasks))


def simulate_days(
    config: Config,
    study_id: str,
    *,
    subjects: int,
    days: int,
    seed: int = 0,
    start: datetime.date | None = None,
    obfuscate: bool = True,
    url: str | None = None,
    progress: bool = False,
    zones: Mapping[str, str] | None = None,
) -> SimulationTruth:
    """Enroll ``subjects`` new subjects in ``study_id`` and send ``days`` simulated local days
    of each (ending yesterday unless ``start`` is given), over HTTP to ``url`` or, without it,
    through the same ingest path the server runs; return the truth.

    Example: ``simulate_days(load_config(), "demo", subjects=5, days=7, seed=1).days``.
    """
    from workbench.catalog import open_catalog
    from workbench.enrollment import enroll
    from workbench.studies import get_study
    from workbench.subjects import set_timezone

    catalog = open_catalog(config)
    try:
        study = get_study(catalog, study_id)
        if not set(study.sensors) & set(SENSORS):
            raise WorkbenchError(
                f"study {study_id!r} records none of the simulated sensors ({', '.join(SENSORS)})"
            )
        if url is not None:
            check_server(url)
        people = enroll(catalog, study_id, subjects)
        for person in people:
            if zones and person.subject in zones:
                set_timezone(catalog, study_id, person.subject, zones[person.subject])
    finally:
        catalog.dispose()
    timezone = study.definition.get("timezone") or "UTC"
    if start is None:
        start = datetime.datetime.now(zoneinfo.ZoneInfo(timezone)).date() - datetime.timedelta(days)
    plans = plan_days(
        study_id,
        [p.subject for p in people],
        days=days,
        start=start,
        timezone=timezone,
        zones=zones,
        sensors=study.sensors,
        tasks=study.definition.get("tasks") or DEFAULT_TASKS,
        seed=seed,
        obfuscate=obfuscate,
    )
    tokens = {p.subject: p.token for p in people}
    tables, homes, batches, records = [], [], 0, 0
    phone = HttpPhones(url) if url is not None else IngestPhones(config)
    bar = tqdm(total=subjects * days, unit="subject-day", desc="simulating", disable=not progress)
    began = time.perf_counter()
    try:
        for planned in plans:
            p, token = planned.profile, tokens[planned.profile.subject]
            phone.register(study_id, p.subject, p.device, token, joined=planned.timeline.start_ms)
            for batch in planned.batches:
                phone.send(batch.body, token)
                records += batch.records
            batches += len(planned.batches)
            tables.append(planned.truth)
            home = p.places[HOME]
            homes.append({"subject": p.subject, "device": p.device, "zone": p.zone,
                          "lat": home.lat, "lon": home.lon})  # fmt: skip
            bar.update(days)
    finally:
        bar.close()
        phone.close()
    report = phone.report
    return SimulationTruth(
        days=pl.concat(tables, how="diagonal"),
        homes=pl.DataFrame(homes),
        batches=batches,
        records=records,
        stored=report.stored,
        duplicates=report.duplicates,
        failed=report.failed,
        errors=report.errors,
        seconds=time.perf_counter() - began,
    )
