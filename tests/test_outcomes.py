"""Study outcomes: dispositions from histories uploaded through the server, at two report
dates; EMA compliance from answered prompts; questionnaire dispositions by the schedule."""

from __future__ import annotations

import httpx
import orjson
import polars as pl
import pytest

from tests.conftest import DAY, HOUR, START_MS, Phone
from workbench.enrollment import enroll
from workbench.refresh import refresh_status
from workbench.reports import (
    attrition,
    attrition_methods,
    ema_compliance,
    prompt_key,
    questionnaire_dispositions,
    sensing_dispositions,
)
from workbench.studies import create_study, definition_from_options

T = START_MS  # every subject below joins at T unless said otherwise


def send_days(phone: Phone, days: list[float], sensor: str = "accelerometer") -> None:
    """One batch of five records (a minute apart) at each of ``days`` after T."""
    for day in days:
        answer = phone.upload(phone.batch(sensor, n=5, start=int(T + day * DAY)))
        assert answer.status_code == 200, answer.text


def test_sensing_dispositions_are_the_same_whatever_day_the_report_runs(home, catalog, server):
    """The demo study lasts 14 days; staleness allowance 48 h, so data must reach day 12."""
    people = enroll(catalog, "demo", 6)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        phones = {}
        for name, enrollment in zip("ABCDEF", people, strict=True):
            phones[name] = Phone(client, enrollment, device=f"dev-{name}")
            assert phones[name].register(time_joined=T).status_code == 200
        send_days(phones["A"], [0, 1, 2, 3])  # silent after day 3, never leaves
        send_days(phones["B"], [0, 4, 8, 12.5])  # data reached the end less 48 h
        send_days(phones["C"], [0, 2, 5])
        assert phones["C"].set_status(1, time_left=T + 5 * DAY + HOUR).status_code == 200
        # D registered and never sent anything
        send_days(phones["E"], [0, 5, 11])  # stopped three days before the end
        send_days(phones["F"], [0, 6, 12.2])  # left an hour after its data reached day 12
        assert phones["F"].set_status(1, time_left=T + 13 * DAY).status_code == 200

    refresh_status(home, mail=False)  # attrition reads what the refresh produced

    def outcome(day: float) -> dict:
        table = attrition(home, "demo", now=int(T + day * DAY)).dispositions
        return {
            p: (d, None if days is None else round(days, 2))
            for p, d, days in table.select("participant", "disposition", "days").iter_rows()
        }

    a, b, c, d, e, f = (p.subject for p in people)
    settled = {
        a: ("lost to follow-up", 3.0),  # at the last data (3 days and 4 minutes)
        b: ("completed", 14.0),
        c: ("withdrawn", 5.04),
        d: ("not started", None),
        e: ("lost to follow-up", 11.0),
        f: ("completed", 14.0),
    }
    on_day_40, on_day_20 = outcome(40), outcome(20)
    assert on_day_40 == on_day_20 == settled
    # Inside the protocol period, A (silent for six days) is already lost at day 3
    on_day_9 = outcome(9)
    assert on_day_9[a] == settled[a] and on_day_9[c] == settled[c]


@pytest.mark.parametrize(
    ("last_day", "left_day", "now_day", "expected"),
    [
        (3, None, 20, ("lost to follow-up", 3.0)),  # the observed bug: it was "completed" at 40
        (3, None, 40, ("lost to follow-up", 3.0)),
        (26, None, 40, ("completed", 28.0)),  # 26 >= 28 - 2 days of allowance
        (25.9, None, 40, ("lost to follow-up", 25.9)),
        (10, 10.5, 40, ("withdrawn", 10.5)),
        (27, 27.5, 40, ("completed", 28.0)),  # left after the data reached the end
        (4, 30, 40, ("lost to follow-up", 4.0)),  # "left" after the period: not a withdrawal
        (4, None, 5, ("active", 5.0)),  # silent for a day only: censored at the report
        (None, None, 40, ("not started", None)),
    ],
)
def test_sensing_disposition_rules_by_hand(last_day, left_day, now_day, expected):
    left = left_day is not None
    status = pl.DataFrame(
        {
            "subject_name": ["s"],
            "date_registered": [T],
            "date_left_study": [T + int(left_day * DAY) if left else None],
            "last_data": [None if last_day is None else T + int(last_day * DAY)],
            "status_code": [1 if left else 0],
        },
        schema_overrides={"date_left_study": pl.Int64, "last_data": pl.Int64},
    )
    out = sensing_dispositions(
        status, duration_days=28, staleness_hours=48, now=T + int(now_day * DAY)
    )
    days = out["days"][0]
    assert (out["disposition"][0], None if days is None else round(days, 2)) == expected


def test_a_subject_still_on_one_device_has_not_withdrawn():
    status = pl.DataFrame(
        {
            "subject_name": ["s", "s"],
            "date_registered": [T, T + DAY],
            "date_left_study": [T + 2 * DAY, None],
            "last_data": [T + 2 * DAY, T + 9 * DAY],
            "status_code": [1, 0],
        }
    )
    out = sensing_dispositions(status, duration_days=28, staleness_hours=48, now=T + 10 * DAY)
    assert out.row(0, named=True)["disposition"] == "active"
    assert out["days"][0] == 10.0  # from the first device's joining


# ---------------------------------------------------------------------------- EMA


def ema_prompt(phone: Phone, opened: int, questions: int = 3) -> list[dict]:
    """The records the EMA app uploads for one answered prompt: one per question."""
    return [
        {
            "studyId": phone.study,
            "username": phone.subject,
            "deviceid": phone.device,
            "sensorname": "ema",
            "timestamp": opened + 20_000 * (q + 1),
            "subjectId": phone.subject,
            "questionId": q + 1,
            "answerId": 2,
            "surveyVersion": 3,
            "databaseId": 17,
            "startTime": str(opened),
            "endTime": str(opened + 90_000),
            "answerText": "a little",
            "answer": None,
            "freeText": "",
        }
        for q in range(questions)
    ]


@pytest.fixture
def ema_study(catalog):
    definition = definition_from_options("mood", duration_days=14, sensors=["accelerometer", "ema"])
    definition["ema"] = True
    definition["ema_prompts_per_day"] = 4
    return create_study(catalog, definition)


def test_ema_compliance_counts_answered_prompts_across_both_apps(home, catalog, ema_study, client):
    p, q, r, s = enroll(catalog, "mood", 4)
    main = {
        x.subject: Phone(client, x, device=f"main-{i}", study="mood")
        for i, x in enumerate((p, q, r, s))
    }
    ema = {
        x.subject: Phone(client, x, device=f"ema-{i}", study="mood")
        for i, x in enumerate((p, q, r, s))
    }
    joined = {p.subject: T, q.subject: T + 8 * DAY + 20 * HOUR, r.subject: T, s.subject: T}
    for subject, phone in main.items():
        assert phone.register(time_joined=joined[subject]).status_code == 200
    for subject, phone in ema.items():
        message = {
            "studyId": "mood",
            "username": subject,
            "deviceid_ema": phone.device,
            "status_ema": 0,
            "time_joined_ema": joined[subject],
        }
        assert phone.post("add_user", orjson.dumps(message)).status_code == 200

    def send(phone: Phone, opened: list[int]) -> None:
        records = [rec for at in opened for rec in ema_prompt(phone, at)]
        assert phone.upload(records).status_code == 200

    # P: 4 prompts a day for 10 days, days 0-4 from the EMA app, days 5-9 from the phone;
    # day 9's first prompt is sent again in a later batch (the app retried): counted once.
    for day in range(10):
        phone = ema[p.subject] if day < 5 else main[p.subject]
        send(phone, [T + day * DAY + (2 + 4 * k) * HOUR for k in range(4)])
    send(main[p.subject], [T + 9 * DAY + 2 * HOUR])
    # Q joined at 20:00 (relative to T) a day and a half before the report: one whole day,
    # four prompts due, six answered: capped at 100 %, not 150 %.
    start_q = joined[q.subject]
    send(ema[q.subject], [start_q + h * HOUR for h in (1, 2, 3, 25, 26, 27)])
    # R: ten prompts in two batches over ten days: 10 of 40
    send(ema[r.subject], [T + day * DAY + HOUR for day in range(5)])
    send(ema[r.subject], [T + day * DAY + HOUR for day in range(5, 10)])
    # S registered both apps and never sent anything: counted apart
    now = T + 10 * DAY + 12 * HOUR
    refresh_status(home, now=now, mail=False)
    result = attrition(home, "mood", now=now)
    table = {row["participant"]: row for row in result.compliance.iter_rows(named=True)}
    assert (table[p.subject]["prompts_due"], table[p.subject]["prompts_answered"]) == (40, 40)
    assert table[p.subject]["compliance_pct"] == 100.0
    assert (table[q.subject]["prompts_due"], table[q.subject]["prompts_answered"]) == (4, 6)
    assert table[q.subject]["compliance_pct"] == 100.0
    assert table[r.subject]["compliance_pct"] == 25.0 and table[r.subject]["below_80_pct"]
    assert table[s.subject]["started"] is False and table[s.subject]["compliance_pct"] is None
    assert table[s.subject]["below_80_pct"] is None  # not counted as 0 %
    methods = attrition_methods(home, result)
    assert "4 per day over each participant's whole days" in methods
    assert "Jones et al., 2019" in methods and "capped at 100 %" in methods


@pytest.mark.parametrize(
    ("record", "key"),
    [
        ({"startTime": "1700000000000", "surveyVersion": 3, "timestamp": 5}, ("3", 1700000000000)),
        ({"timestamp": 1700000000123}, ("record", 1700000000123)),  # no startTime
        ({"startTime": "", "timestamp": 42}, ("record", 42)),
        ({"startTime": "soon"}, None),
    ],
)
def test_prompt_key(record, key):
    assert prompt_key(record) == key


def test_ema_compliance_by_hand():
    people = pl.DataFrame(
        {
            "participant": ["a", "b", "c"],
            "disposition": ["active", "withdrawn", "not started"],
            "start": [0, 0, 0],
            "end": [3 * DAY + 5 * HOUR, 2 * DAY - 1, 0],
        }
    )
    prompts = pl.DataFrame(
        {
            "participant": ["a"] * 7 + ["b"] * 3,
            "at": [HOUR * k for k in range(7)] + [HOUR, DAY + HOUR, 2 * DAY + HOUR],
        }
    )
    out = ema_compliance(people, prompts, prompts_per_day=2.5)
    rows = {r["participant"]: r for r in out.iter_rows(named=True)}
    # a: 3 whole days x 2.5 = 7 (7.5 rounded down) due, 7 answered
    assert (rows["a"]["days_in_study"], rows["a"]["prompts_due"]) == (3, 7)
    assert rows["a"]["compliance_pct"] == 100.0
    # b left just before day 2: 1 whole day, 2 due; the prompt after leaving is not counted
    assert (rows["b"]["prompts_due"], rows["b"]["prompts_answered"]) == (2, 2)
    assert rows["c"]["compliance_pct"] is None and rows["c"]["days_in_study"] is None


# ---------------------------------------------------------------------------- questionnaires

SCHEDULE = {"PRE": 0, "WEEK4": 28, "POST": 56}


def visits(*rows) -> pl.DataFrame:
    return pl.DataFrame(
        [(p, s, T + int(d * DAY)) for p, s, d in rows],
        schema={"participant": pl.String, "session": pl.String, "at": pl.Int64},
        orient="row",
    )


@pytest.mark.parametrize(
    ("rows", "now_day", "expected"),
    [
        ([("x", "PRE", 0)], 10, ("active", 10.0)),  # waiting for WEEK4: not a dropout
        ([("x", "PRE", 0)], 35, ("active", 35.0)),  # WEEK4 due on day 28, grace 7 days
        ([("x", "PRE", 0)], 35.5, ("lost to follow-up", 0.0)),  # at the last answer
        ([("x", "PRE", 0), ("x", "WEEK4", 30)], 62, ("active", 62.0)),
        ([("x", "PRE", 0), ("x", "WEEK4", 30)], 64, ("lost to follow-up", 30.0)),
        ([("x", "PRE", 0), ("x", "WEEK4", 29), ("x", "POST", 57)], 64, ("completed", 57.0)),
        ([("x", "PRE", 0), ("x", "POST", 58)], 100, ("completed", 58.0)),  # last one done
    ],
)
def test_questionnaire_dispositions_follow_the_schedule(rows, now_day, expected):
    out = questionnaire_dispositions(
        visits(*rows), now=T + int(now_day * DAY), session_days=SCHEDULE, grace_days=7
    )
    assert (out["disposition"][0], round(out["days"][0], 2)) == expected


def test_questionnaire_grace_is_configurable():
    rows = visits(("x", "PRE", 0))
    now = T + 31 * DAY
    kept = questionnaire_dispositions(rows, now=now, session_days=SCHEDULE, grace_days=7)
    strict = questionnaire_dispositions(rows, now=now, session_days=SCHEDULE, grace_days=2)
    assert (kept["disposition"][0], strict["disposition"][0]) == ("active", "lost to follow-up")


def test_questionnaire_dispositions_from_an_export_at_two_report_dates(
    home, keys, monkeypatch, catalog
):
    """Answers exported from the study server; the same dispositions on day 70 and day 90."""
    from datetime import UTC, datetime

    from tests.conftest import configure
    from workbench.export import export_source
    from workbench.simulators.study_server import DATE_FORMAT, StudyServer, encrypt_value

    def row(i, person, session, day):
        when = datetime.fromtimestamp((T + day * DAY) / 1000, UTC).strftime(DATE_FORMAT)
        return {
            "id": i,
            "date": when,
            "participantRSA": encrypt_value(keys / "public_key.pem", person),
            "session": session,
        }

    answers = [
        ("P1", "PRE", 0), ("P1", "WEEK4", 28), ("P1", "POST", 56),  # completed
        ("P2", "PRE", 1), ("P2", "WEEK4", 30),  # missed POST (due day 57) by more than 7
        ("P3", "PRE", 2),  # missed WEEK4
    ]  # fmt: skip
    table = [row(i, *a) for i, a in enumerate(answers, start=1)]
    server = StudyServer({"GAD7": table}, deleteable={"GAD7": True}, user="mt", password="secret")
    config = configure(
        home,
        keys,
        monkeypatch,
        schedule='{ GAD7 = ["PRE", "WEEK4", "POST"] }',
        session_days="{ PRE = 0, WEEK4 = 28, POST = 56 }",
        grace_days="7",
    )
    export_source(
        config, "mindtrails", transport=httpx.WSGITransport(app=server.app()), catalog=catalog
    )

    def outcome(day):
        result = attrition(config, "mindtrails", now=T + day * DAY)
        return dict(result.dispositions.select("participant", "disposition").iter_rows())

    expected = {"P1": "completed", "P2": "lost to follow-up", "P3": "lost to follow-up"}
    assert outcome(70) == outcome(90) == expected
    methods = attrition_methods(config, attrition(config, "mindtrails", now=T + 70 * DAY))
    assert "PRE on day 0, WEEK4 on day 28, POST on day 56" in methods
    assert "more than 7 days of grace" in methods
    # on day 20 everyone is waiting for WEEK4: active, nobody is a dropout
    assert set(outcome(20).values()) == {"completed", "active"}
