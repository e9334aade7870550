"""Job tracking: configurations and their schema, progress in the catalog, the HTTP API
(in-process and over real HTTP), the client that never fails the tracked job, the CLI."""

from __future__ import annotations

import copy
import json
import logging
import re
import socket
import threading
import time
import uuid
from wsgiref.simple_server import WSGIRequestHandler, make_server

import click
import httpx
import jsonschema
import pytest
from click.testing import CliRunner
from sqlalchemy import select, text, update
from workbench_server.jobs import install_job_routes

from tests.conftest import ServerProcess
from workbench import catalog as tables
from workbench.cli_jobs import jobs
from workbench.config import JobsConfig, load_config
from workbench.errors import ConfigError
from workbench.jobs import (
    InvalidJobConfig,
    InvalidJobRequest,
    JobConfigConflict,
    JobConfigManager,
    JobConflict,
    MetadataTooDeep,
    MetadataTooLarge,
    StepConfig,
    TooManyEvents,
    UnknownJob,
    UnknownJobConfig,
    check_api_key,
    create_api_key,
    create_job,
    events_page,
    generate_schema,
    get_job,
    job_config_schema,
    list_job_configs,
    list_jobs,
    nesting_depth,
    record_event,
    save_job_configs,
)
from workbench.tracker import TrackerApi

# The configurations file of the trackerapi README, verbatim.
README_FILE = """\
{
  "$schema": "./job-configurations-schema.generated.json",
  "job_configs": [
    {
      "name": "My Job",
      "tag": "my_job",
      "step_configurations": [
        {
          "name": "Say Hello",
          "tag": "say_hello",
          "points": 10
        },
        {
          "name": "Generate Random Number",
          "tag": "random_number",
          "points": 15
        },
        {
          "name": "Say Bye",
          "tag": "say_bye",
          "points": 10
        }
      ]
    }
  ]
}
"""
README = json.loads(README_FILE)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "job_configurations.json"
    path.write_text(README_FILE)
    return path


@pytest.fixture
def saved(catalog):
    """The README's configuration saved in the catalog."""
    save_job_configs(catalog, JobConfigManager(README))
    return catalog


def new_id() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------- configurations


def test_the_readme_example_file_loads(config_file):
    manager = JobConfigManager(configurations_file=str(config_file))
    job_config = manager.get_job_config("my_job")
    assert job_config.name == "My Job"
    assert [s.tag for s in job_config.step_configurations] == [
        "say_hello",
        "random_number",
        "say_bye",
    ]
    assert [s.points for s in job_config.step_configurations] == [10, 15, 10]
    assert job_config.total_points == 35
    assert manager.as_dict() == {"job_configs": README["job_configs"]}


def _job(document):
    return document["job_configs"][0]


def _steps(document):
    return _job(document)["step_configurations"]


BAD_CONFIGS = {
    "duplicate job tag": (
        lambda d: d["job_configs"].append(copy.deepcopy(_job(d))),
        "job tag 'my_job' is used twice ($.job_configs[0] and $.job_configs[1])",
    ),
    "duplicate step tag": (
        lambda d: _steps(d)[2].update(tag="say_hello"),
        "step tag 'say_hello' is used twice in job 'my_job'",
    ),
    "zero points": (
        lambda d: _steps(d)[1].update(points=0),
        "$.job_configs[0].step_configurations[1].points: 0 is less than the minimum of 1",
    ),
    "negative points": (
        lambda d: _steps(d)[1].update(points=-5),
        "$.job_configs[0].step_configurations[1].points: -5 is less than the minimum of 1",
    ),
    "fractional points": (
        lambda d: _steps(d)[0].update(points=2.5),
        "$.job_configs[0].step_configurations[0].points: 2.5 is not of type 'integer'",
    ),
    "points as text": (
        lambda d: _steps(d)[0].update(points="10"),
        "$.job_configs[0].step_configurations[0].points: '10' is not of type 'integer'",
    ),
    "points as boolean": (
        lambda d: _steps(d)[0].update(points=True),
        "$.job_configs[0].step_configurations[0].points: True is not of type 'integer'",
    ),
    "step without tag": (
        lambda d: _steps(d)[0].pop("tag"),
        "$.job_configs[0].step_configurations[0]: 'tag' is a required property",
    ),
    "job without tag": (
        lambda d: _job(d).pop("tag"),
        "$.job_configs[0]: 'tag' is a required property",
    ),
    "no steps": (
        lambda d: _job(d).update(step_configurations=[]),
        "$.job_configs[0].step_configurations: [] should be non-empty",
    ),
    "misspelt field": (
        lambda d: _job(d).update(steps=[]),
        "$.job_configs[0]: Additional properties are not allowed ('steps' was unexpected)",
    ),
    "no job_configs": (
        lambda d: d.pop("job_configs"),
        "$: 'job_configs' is a required property",
    ),
}


@pytest.mark.parametrize("change, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS)
def test_bad_configurations_are_refused_naming_file_and_path(tmp_path, change, message):
    document = copy.deepcopy(README)
    change(document)
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidJobConfig) as raised:
        JobConfigManager(configurations_file=path)
    assert raised.value.message.startswith(f"{path}: ")
    assert message in raised.value.message


def test_a_file_that_is_not_json_is_refused_with_its_line(tmp_path):
    path = tmp_path / "jobs.json"
    path.write_text('{\n  "job_configs": [\n    {"name": "x",}\n  ]\n}\n')
    with pytest.raises(InvalidJobConfig, match=r"jobs.json is not JSON: .* at line 3"):
        JobConfigManager(path)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidJobConfig, match="cannot read job configurations .*nothing.json"):
        JobConfigManager(tmp_path / "nothing.json")


def test_points_written_as_10_0_count_as_10():
    document = copy.deepcopy(README)
    _steps(document)[0]["points"] = 10.0
    points = JobConfigManager(document).get_job_config("my_job").step_configurations[0].points
    assert points == 10 and type(points) is int


@pytest.mark.parametrize("points", [0, -1, 1.5, "3", True])
def test_steps_made_in_python_check_their_points(points):
    with pytest.raises(InvalidJobConfig, match="points must be a whole number of at least 1"):
        StepConfig("say_hello", "Say Hello", points)


def test_a_missing_tag_lists_the_known_tags(config_file):
    manager = JobConfigManager(config_file)
    with pytest.raises(UnknownJobConfig) as raised:
        manager.get_job_config("other_job")
    assert raised.value.message == (
        f"no job configuration tagged 'other_job' in {config_file}; known tags: my_job"
    )
    # The README passes the job's name where its tag belongs: say so.
    with pytest.raises(UnknownJobConfig, match="'My Job' is the name of 'my_job': pass its tag"):
        manager.get_job_config("My Job")


# ---------------------------------------------------------------- the schema and its command


def test_the_schema_accepts_the_readme_file_as_an_editor_would(tmp_path, config_file):
    path = generate_schema(config_file.parent)
    assert path == config_file.parent / "job-configurations-schema.generated.json"
    schema = json.loads(path.read_text())
    assert schema == job_config_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    # "$schema" in the README file points at the generated file beside it.
    document = json.loads(config_file.read_text())
    assert (config_file.parent / document["$schema"]).resolve() == path.resolve()
    jsonschema.Draft202012Validator(schema).validate(document)
    bad = copy.deepcopy(document)
    _steps(bad)[0]["points"] = 0
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)


def test_schema_command_writes_name_at_location(tmp_path, home):
    target = tmp_path / "out" / "schemas"
    result = CliRunner().invoke(
        jobs, ["schema", "-l", str(target), "-n", "mine"], obj={"home": home.home}
    )
    assert result.exit_code == 0, result.output
    path = target / "mine.generated.json"
    assert result.output == f"Generated JSON Schema for JobConfigs at {path}\n"
    assert json.loads(path.read_text()) == job_config_schema()


def test_schema_command_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(jobs, ["schema"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "job-configurations-schema.generated.json").is_file()
    assert result.output.startswith("Generated JSON Schema for JobConfigs at ")
    # The long options too.
    result = CliRunner().invoke(jobs, ["schema", "--location", "sub", "--name", "x"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sub" / "x.generated.json").is_file()


# ---------------------------------------------------------------- progress in the catalog


def test_configurations_are_saved_by_tag(catalog):
    save_job_configs(catalog, JobConfigManager(README))
    changed = copy.deepcopy(README)
    _steps(changed)[0]["points"] = 30
    save_job_configs(catalog, JobConfigManager(changed))
    with catalog.engine.connect() as conn:
        rows = conn.execute(select(tables.job_configurations)).all()
    assert [(r.tag, r.total_points) for r in rows] == [("my_job", 55)]


def versioned(version, steps=None):
    """The README's configuration with a version (and other steps)."""
    job = {**copy.deepcopy(_job(README)), "version": version}
    if steps is not None:
        job["step_configurations"] = steps
    return JobConfigManager({"job_configs": [job]})


def test_a_version_is_registered_once_and_jobs_keep_theirs(catalog):
    save_job_configs(catalog, versioned("1.0.0"))
    save_job_configs(catalog, versioned("1.0.0"))  # the same again: fine
    old = create_job(catalog, provider_job_id="old", customer_id=1, tag="my_job")
    shorter = _steps(README)[1:]
    with pytest.raises(JobConfigConflict, match="'my_job' version '1.0.0' is already registered"):
        save_job_configs(catalog, versioned("1.0.0", shorter))
    assert [(c.version, c.total_points) for c in list_job_configs(catalog)] == [("1.0.0", 35)]

    save_job_configs(catalog, versioned("2.0.0", shorter))
    save_job_configs(catalog, versioned("1.0.0"))  # an old version again: 2.0.0 stays current
    [current] = list_job_configs(catalog)
    assert (current.version, current.total_points) == ("2.0.0", 25)
    new = create_job(catalog, provider_job_id="new", customer_id=1, tag="my_job")
    assert (old["points_total"], new["points_total"]) == (35, 25)
    # The job of 1.0.0 still takes its step that 2.0.0 dropped.
    record_event(catalog, provider_job_id="old", kind="step", tag="say_hello", event_id="a")
    assert get_job(catalog, "old")["points_done"] == 10
    assert [s["tag"] for s in get_job(catalog, "new")["steps"]] == ["random_number", "say_bye"]
    with pytest.raises(InvalidJobRequest, match="has no step 'say_hello'"):
        record_event(catalog, provider_job_id="new", kind="step", tag="say_hello", event_id="a")


def test_a_conflicting_version_in_a_file_saves_none_of_it(catalog):
    save_job_configs(catalog, versioned("1.0.0"))
    other = {"name": "Other", "tag": "other", "step_configurations": _steps(README)}
    changed = {**_job(versioned("1.0.0", _steps(README)[:1]).as_dict()), "name": "Renamed"}
    with pytest.raises(JobConfigConflict):
        save_job_configs(catalog, JobConfigManager({"job_configs": [other, changed]}))
    assert [c.tag for c in list_job_configs(catalog)] == ["my_job"]


def test_a_schema_6_catalog_gains_configuration_versions(home):
    catalog = tables.open_catalog(home)
    save_job_configs(catalog, JobConfigManager(README))
    create_job(catalog, provider_job_id="kept", customer_id=1, tag="my_job")
    with catalog.writing() as conn:  # as schema 6 left it
        conn.execute(text("DROP TABLE job_config_versions"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN config_version"))
        conn.execute(text("ALTER TABLE job_configurations DROP COLUMN version"))
        conn.execute(text("UPDATE schema_info SET value = '6' WHERE key = 'version'"))
    catalog.dispose()
    catalog = tables.open_catalog(home)
    assert catalog.version() == tables.SCHEMA_VERSION
    tables._add_job_config_versions(catalog.engine.connect())  # a second run changes nothing
    record_event(catalog, provider_job_id="kept", kind="step", tag="say_bye", event_id="a")
    assert get_job(catalog, "kept")["points_done"] == 10
    save_job_configs(catalog, versioned("1.0.0"))
    assert [c.version for c in list_job_configs(catalog)] == ["1.0.0"]
    catalog.dispose()


def test_steps_move_progress_by_their_points_once(saved):
    job_id = new_id()
    job = create_job(saved, provider_job_id=job_id, customer_id=142, tag="my_job")
    assert (job["status"], job["progress"], job["points_total"]) == ("running", 0.0, 35)
    assert job["customer_id"] == "142"

    record_event(saved, provider_job_id=job_id, kind="step", tag="say_hello", event_id="e1")
    assert get_job(saved, job_id)["points_done"] == 10
    # The same step again, as a new event: recorded, adds nothing.
    again = record_event(saved, provider_job_id=job_id, kind="step", tag="say_hello", event_id="e2")
    assert (again["points"], again["duplicate"]) == (0, False)
    # The same event resent: changes nothing and answers the stored event.
    resent = record_event(
        saved,
        provider_job_id=job_id,
        kind="step",
        tag="random_number",  # even with other contents
        event_id="e1",
    )
    assert (resent["tag"], resent["points"], resent["duplicate"]) == ("say_hello", 10, True)
    job = get_job(saved, job_id)
    assert job["points_done"] == 10
    assert [e["event_id"] for e in job["events"]] == ["e1", "e2"]

    record_event(saved, provider_job_id=job_id, kind="step", tag="random_number", event_id="e3")
    assert get_job(saved, job_id)["progress"] == pytest.approx(25 / 35)
    record_event(saved, provider_job_id=job_id, kind="complete", event_id="e4")
    job = get_job(saved, job_id)
    assert (job["status"], job["progress"], job["points_done"]) == ("complete", 1.0, 35)
    # After completion nothing moves.
    record_event(saved, provider_job_id=job_id, kind="step", tag="say_bye", event_id="e5")
    record_event(saved, provider_job_id=job_id, kind="error", event_id="e6")
    job = get_job(saved, job_id)
    assert (job["status"], job["points_done"]) == ("complete", 35)
    assert [s["done"] for s in job["steps"]] == [True, True, True]


def test_an_error_event_marks_the_job_failed(saved):
    job_id = new_id()
    create_job(saved, provider_job_id=job_id, customer_id=None, tag="my_job")
    record_event(saved, provider_job_id=job_id, kind="step", tag="say_hello", event_id="a")
    record_event(
        saved, provider_job_id=job_id, kind="error", metadata={"why": "disk full"}, event_id="b"
    )
    job = get_job(saved, job_id)
    assert (job["status"], job["points_done"]) == ("error", 10)
    assert job["events"][-1]["metadata"] == {"why": "disk full"}
    assert list_jobs(saved)[0]["status"] == "error"


def test_creating_a_job_again(saved):
    job_id = new_id()
    first = create_job(saved, provider_job_id=job_id, customer_id="c", tag="my_job")
    assert create_job(saved, provider_job_id=job_id, customer_id="c", tag="my_job") == first
    save_job_configs(saved, JobConfigManager({"job_configs": [{**_job(README), "tag": "other"}]}))
    with pytest.raises(JobConflict):
        create_job(saved, provider_job_id=job_id, customer_id="c", tag="other")
    assert len(list_jobs(saved)) == 1


def test_a_job_needs_a_saved_configuration(saved):
    with pytest.raises(UnknownJobConfig, match="no job configuration tagged 'nope'.*: my_job$"):
        create_job(saved, provider_job_id=new_id(), customer_id=1, tag="nope")
    assert list_jobs(saved) == []


def test_a_job_may_name_its_configuration_by_its_display_name(saved):
    # trackerapi's README creates the job with tag=job_config.name.
    job = create_job(saved, provider_job_id="j", customer_id=1, tag="My Job")
    assert (job["tag"], job["points_total"]) == ("my_job", 35)
    assert create_job(saved, provider_job_id="j", customer_id=1, tag="my_job") == job
    # A name two configurations share names neither.
    save_job_configs(saved, JobConfigManager({"job_configs": [{**_job(README), "tag": "twin"}]}))
    with pytest.raises(UnknownJobConfig, match="no job configuration tagged 'My Job'"):
        create_job(saved, provider_job_id="k", customer_id=1, tag="My Job")


@pytest.mark.parametrize(
    "kind, tag, message",
    [
        ("progress", "say_hello", "kind must be one of step, complete, error"),
        ("step", None, "tag must be a non-empty string"),
        ("step", "say_goodnight", "job 'my_job' has no step 'say_goodnight'; its steps: say_hello"),
    ],
)
def test_bad_events_are_refused(saved, kind, tag, message):
    job_id = new_id()
    create_job(saved, provider_job_id=job_id, customer_id=1, tag="my_job")
    with pytest.raises(InvalidJobRequest, match=message):
        record_event(saved, provider_job_id=job_id, kind=kind, tag=tag, event_id="x")
    assert get_job(saved, job_id)["events"] == []


def test_events_of_an_unknown_job_are_refused(saved):
    with pytest.raises(UnknownJob):
        record_event(saved, provider_job_id="nope", kind="complete", event_id="x")


def test_api_keys_are_stored_hashed_and_can_be_revoked(catalog):
    key = create_api_key(catalog, customer_id="142")
    provider_key = create_api_key(catalog)
    assert key != provider_key and len(key) >= 43
    assert check_api_key(catalog, key) == "142"
    assert check_api_key(catalog, provider_key) == ""
    for wrong in ["", None, key[:-1], key + "x", "x" * 10_000]:
        assert check_api_key(catalog, wrong) is None
    with catalog.engine.connect() as conn:
        stored = conn.execute(select(tables.api_keys)).all()
    assert all(key not in str(tuple(row)) for row in stored)
    with catalog.writing() as conn:
        conn.execute(update(tables.api_keys).values(revoked_at=1))
    assert check_api_key(catalog, key) is None


# ---------------------------------------------------------------- limits


def nested(depth: int) -> object:
    """A JSON value with ``depth`` levels of arrays and objects."""
    value: object = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"x": value}
    return value


@pytest.mark.parametrize("depth", [0, 1, 5, 33, 1000])
def test_nesting_depth_counts_arrays_and_objects(depth):
    assert nesting_depth(nested(depth)) == depth


@pytest.mark.parametrize(
    "metadata, error, message",
    [
        (nested(33), MetadataTooDeep, "event metadata nests 33 levels of arrays and objects; at "),
        ({"x": "a" * 20000}, MetadataTooLarge, "event metadata of 20009 bytes (as JSON) is over"),
    ],
    ids=["too deep", "too large"],
)
def test_metadata_over_the_limits_is_refused_and_not_stored(saved, metadata, error, message):
    job_id = new_id()
    create_job(saved, provider_job_id=job_id, customer_id=1, tag="my_job")
    with pytest.raises(error, match=re.escape(message)) as refused:
        record_event(
            saved, provider_job_id=job_id, kind="complete", metadata=metadata, event_id="x"
        )
    assert refused.value.to_json()["field"] == "event_metadata"
    job = get_job(saved, job_id)
    assert (job["events"], job["status"]) == ([], "running")
    # Just within the limits is stored.
    record_event(saved, provider_job_id=job_id, kind="step", tag="say_hello",
                 metadata=nested(32), event_id="deep")  # fmt: skip
    record_event(saved, provider_job_id=job_id, kind="step", tag="say_bye",
                 metadata={"x": "a" * (16384 - 9)}, event_id="large")  # fmt: skip
    assert [e["event_id"] for e in get_job(saved, job_id)["events"]] == ["deep", "large"]


def test_a_full_job_takes_only_events_that_move_it(saved):
    limits = JobsConfig(max_events=3)
    job_id = new_id()
    create_job(saved, provider_job_id=job_id, customer_id=1, tag="my_job")

    def event(event_id, kind="step", tag="say_hello"):
        return record_event(saved, provider_job_id=job_id, kind=kind, tag=tag,
                            event_id=event_id, limits=limits)  # fmt: skip

    for n in range(3):
        event(f"hello-{n}")  # one moves the job, two repeat the step
    with pytest.raises(TooManyEvents, match=f"job '{job_id}' holds 3 events, the limit"):
        event("hello-3")
    assert event("hello-1")["duplicate"] is True  # a resent event is still answered
    event("bye", tag="say_bye")  # a step's first report moves the job: taken
    event("done", kind="complete")
    with pytest.raises(TooManyEvents):
        event("error", kind="error")  # the job is complete: this would move nothing
    job = get_job(saved, job_id)
    assert (job["status"], job["points_done"], len(job["events"])) == ("complete", 35, 5)


def test_events_are_read_a_page_at_a_time(saved):
    job_id = new_id()
    create_job(saved, provider_job_id=job_id, customer_id=1, tag="my_job")
    for n in range(7):
        record_event(saved, provider_job_id=job_id, kind="step", tag="say_hello", event_id=f"e{n}")
    pages, after = [], None
    while True:
        page, after = events_page(saved, job_id, after=after, limit=3)
        pages.append([e["event_id"] for e in page])
        if after is None:
            break
    assert pages == [["e0", "e1", "e2"], ["e3", "e4", "e5"], ["e6"]]
    assert events_page(saved, job_id, after="e6", limit=3) == ([], None)
    with pytest.raises(InvalidJobRequest, match=f"job '{job_id}' has no event 'e9' to page"):
        events_page(saved, job_id, after="e9")
    with pytest.raises(UnknownJob):
        events_page(saved, job_id, as_customer="someone else")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("max_events = 0", "[jobs] max_events must be a positive integer"),
        ('max_metadata_depth = "deep"', "[jobs] max_metadata_depth must be a positive integer"),
        ("page_size = 2000", "[jobs] page_size must not be over max_page_size"),
        ("max_pages = 3", "unknown keys in [jobs]: max_pages"),
    ],
)
def test_bad_job_limits_are_a_configuration_error(home, setting, message):
    path = home.home / "workbench.toml"
    path.write_text(path.read_text().replace("[jobs]\n", f"[jobs]\n{setting}\n"))
    if setting.startswith(("max_events", "max_metadata_depth", "page_size")):
        key = setting.split(" =")[0]  # the template's own line for the key goes
        lines = path.read_text().splitlines()
        first = next(i for i, ln in enumerate(lines) if ln.startswith(f"{key} ="))
        lines = [ln for i, ln in enumerate(lines) if i == first or not ln.startswith(f"{key} =")]
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as refused:
        load_config(home.home)
    assert refused.value.message == message


def test_the_template_sets_the_default_job_limits(home):
    assert load_config(home.home).jobs == JobsConfig()


# ---------------------------------------------------------------- the HTTP API, in-process


def tracker_app(home):
    """The upload server's app with the tracking routes, as ``create_app`` will install them."""
    from workbench_server.app import create_app

    app = create_app(home)
    install_job_routes(app, app.config["workbench.ingest"].catalog)
    return app


@pytest.fixture
def api(home):
    app = tracker_app(home)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://testserver") as c:
        yield c


@pytest.fixture
def key(catalog):
    return create_api_key(catalog)


@pytest.fixture
def configured(api, key):
    answer = api.post("/job_configurations", json=README, headers={"x-api_key": key})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"ok": True, "saved": ["my_job"]}
    return {"x-api_key": key}


ROUTES = [
    ("POST", "/job_configurations", README),
    ("POST", "/jobs", {"provider_job_id": "j", "customer_id": 1, "tag": "my_job"}),
    ("POST", "/events", {"kind": "complete", "provider_job_id": "j"}),
    ("GET", "/jobs/j", None),
]


@pytest.mark.parametrize("method, path, body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
@pytest.mark.parametrize(
    "headers",
    [{}, {"x-api_key": "wrong"}, {"Authorization": "Bearer wrong"}, {"x-api_key": ""}],
    ids=["none", "wrong", "wrong-bearer", "empty"],
)
def test_every_route_needs_a_valid_key(api, key, method, path, body, headers):
    answer = api.request(method, path, json=body, headers=headers)
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == "unauthorized"
    assert answer.json()["message"]


def test_tracking_over_http(api, configured):
    job_id = new_id()
    created = api.post(
        "/jobs",
        json={"provider_job_id": job_id, "customer_id": 142, "tag": "my_job"},
        headers=configured,
    )
    assert created.status_code == 200, created.text
    assert created.json()["job"]["progress"] == 0.0

    def event(kind, tag=None, **extra):
        body = {"kind": kind, "tag": tag, "provider_job_id": job_id, "event_metadata": None}
        answer = api.post("/events", json={**body, **extra}, headers=configured)
        assert answer.status_code == 200, answer.text
        return answer.json()

    assert event("step", "say_hello", event_id="1")["job"]["points_done"] == 10
    # A repeated step and a resent event change nothing.
    assert event("step", "say_hello", event_id="2")["job"]["points_done"] == 10
    resent = event("step", "say_hello", event_id="1")
    assert resent["event"]["duplicate"] is True and resent["job"]["points_done"] == 10
    # Without an event_id, a resend is still recognised.
    first = event("step", "random_number", event_metadata={"Random Number": 7})
    second = event("step", "random_number", event_metadata={"Random Number": 7})
    assert (first["event"]["duplicate"], second["event"]["duplicate"]) == (False, True)
    assert second["job"]["progress"] == pytest.approx(25 / 35)
    assert event("complete")["job"]["progress"] == 1.0

    shown = api.get(f"/jobs/{job_id}", headers=configured)
    assert shown.status_code == 200
    job = shown.json()["job"]
    assert (job["status"], job["progress"], job["name"]) == ("complete", 1.0, "My Job")
    assert [(e["kind"], e["tag"], e["points"]) for e in job["events"]] == [
        ("step", "say_hello", 10),
        ("step", "say_hello", 0),
        ("step", "random_number", 15),
        ("complete", None, 10),
    ]
    assert job["events"][2]["metadata"] == {"Random Number": 7}


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/jobs", b"not json", 400, "the body is not valid JSON"),
        ("/jobs", b"[1, 2]", 400, "the body must be a JSON object"),
        ("/jobs", {"customer_id": 1, "tag": "my_job"}, 400, "provider_job_id must be"),
        ("/jobs", {"provider_job_id": "k", "tag": "nope"}, 400, "known tags: my_job"),
        ("/events", {"kind": "step", "tag": "say_hello"}, 400, "provider_job_id must be"),
        ("/events", {"kind": "done", "provider_job_id": "j"}, 400, "kind must be one of"),
        ("/events", {"kind": "step", "tag": "x", "provider_job_id": "j"}, 400, "has no step 'x'"),
        ("/events", {"kind": "complete", "provider_job_id": "nope"}, 404, "no job 'nope'"),
        ("/job_configurations", {"job_configs": []}, 400, "$.job_configs: [] should be non-empty"),
        ("/job_configurations", {"jobs": []}, 400, "the request body: $: 'job_configs' is a req"),
    ],
)
def test_bad_requests_are_answered_with_a_message(api, configured, path, body, status, message):
    api.post(
        "/jobs",
        json={"provider_job_id": "j", "customer_id": 1, "tag": "my_job"},
        headers=configured,
    )
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = api.post(path, content=content, headers=configured)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["ok"] is False
    assert message in answer.json()["message"]


def test_unknown_job_is_404(api, configured):
    answer = api.get("/jobs/nope", headers=configured)
    assert answer.status_code == 404
    assert answer.json()["error"] == "unknown_job"


def test_the_key_may_come_as_bearer_but_not_twice_different(api, configured, catalog):
    key = configured["x-api_key"]
    assert api.get("/jobs/nope", headers={"Authorization": f"Bearer {key}"}).status_code == 404
    other = create_api_key(catalog)
    both = {"x-api_key": key, "Authorization": f"Bearer {other}"}
    assert api.get("/jobs/nope", headers=both).status_code == 401


def test_a_customer_key_sees_only_its_customer(api, configured, catalog):
    own = {"x-api_key": create_api_key(catalog, customer_id="142")}
    answer = api.post("/jobs", json={"provider_job_id": "mine", "tag": "my_job"}, headers=own)
    assert answer.status_code == 200 and answer.json()["job"]["customer_id"] == "142"
    body = {"provider_job_id": "theirs", "customer_id": 7, "tag": "my_job"}
    assert api.post("/jobs", json=body, headers=own).status_code == 403
    assert api.post("/jobs", json=body, headers=configured).status_code == 200
    assert api.get("/jobs/theirs", headers=own).status_code == 404
    event = {"kind": "complete", "provider_job_id": "theirs"}
    assert api.post("/events", json=event, headers=own).status_code == 404
    assert api.post("/job_configurations", json=README, headers=own).status_code == 403
    assert api.get("/jobs/mine", headers=own).status_code == 200


# ---------------------------------------------------------------- the client


def _tracker(app_or_url, key, spool, **options) -> TrackerApi:
    if isinstance(app_or_url, str):
        return TrackerApi(api_key=key, base_url=app_or_url, spool=spool, **options)
    transport = httpx.WSGITransport(app=app_or_url)
    return TrackerApi(
        api_key=key, base_url="http://testserver", spool=spool, transport=transport, **options
    )


def test_the_readme_job_script_is_tracked(home, catalog, key, config_file, tmp_path):
    app = tracker_app(home)
    spool = tmp_path / "spool.jsonl"
    job_config = JobConfigManager(configurations_file=str(config_file)).get_job_config("my_job")
    with _tracker(app, key, spool) as tracker:
        tracker.post_job_configurations(config_file)
        job_id = new_id()
        job = tracker.create_job(provider_job_id=job_id, customer_id=142, tag=job_config.tag)
        for step, metadata in zip(
            job_config.step_configurations, [{"Message": "Hello John!"}, {"n": 7}, {}], strict=True
        ):
            answer = job.send_event(kind="step", name=step.tag, metadata=metadata)
            assert answer["ok"] is True
    found = get_job(catalog, job_id)
    assert (found["points_done"], found["progress"], found["customer_id"]) == (35, 1.0, "142")
    assert [e["tag"] for e in found["events"]] == ["say_hello", "random_number", "say_bye"]
    assert found["events"][0]["metadata"] == {"Message": "Hello John!"}
    assert not spool.exists()


def test_refusals_are_logged_not_spooled(home, catalog, key, tmp_path, caplog):
    save_job_configs(catalog, JobConfigManager(README))
    app = tracker_app(home)
    spool = tmp_path / "spool.jsonl"
    with _tracker(app, key, spool) as tracker:
        tracker.create_job(provider_job_id="j1", customer_id=142, tag="their_job")
        assert "no job configuration tagged 'their_job'" in caplog.text
        job = tracker.create_job(provider_job_id="j2", customer_id=142, tag="my_job")
        assert job.send_event(kind="step", tag="say_goodnight") is None
        assert "has no step 'say_goodnight'" in caplog.text
    with _tracker(app, "wrong key", spool) as tracker:
        tracker.create_job(provider_job_id="j3", customer_id=142, tag="my_job")
        assert "wrong or revoked API key" in caplog.text
    assert {r.levelno for r in caplog.records} == {logging.ERROR}
    assert not spool.exists()
    assert [j["provider_job_id"] for j in list_jobs(catalog)] == ["j2"]


def test_the_client_registers_the_configuration_the_tracker_lacks(
    home, catalog, key, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="workbench.tracker")
    app = tracker_app(home)
    spool = tmp_path / "spool.jsonl"
    given = versioned("1.0.0")
    with _tracker(app, key, spool, configurations=given) as tracker:
        job = tracker.create_job(provider_job_id="j1", customer_id=142, tag="My Job")
        assert job.tag == "my_job"
        assert job.send_event(kind="complete")["job"]["progress"] == 1.0
        assert "registered the job configuration 'my_job'" in caplog.text
    [saved] = list_job_configs(catalog)
    assert (saved.tag, saved.version) == ("my_job", "1.0.0")

    # A client holding a changed configuration under the same version is refused: the
    # tracker keeps what it has and says why.
    caplog.clear()
    changed = versioned("1.0.0", _steps(README)[:1])
    with _tracker(app, key, spool, configurations=changed) as tracker:
        assert tracker.register_job_config(changed.get_job_config("my_job")) is None
        assert "give the changed configuration a new version" in caplog.text
        assert tracker.create_job(provider_job_id="j2", customer_id=142, tag="my_job")
    assert get_job(catalog, "j2")["points_total"] == 35  # the tracker's configuration
    assert list_job_configs(catalog) == [saved]
    assert not spool.exists()


def test_the_constructor_makes_no_request(tmp_path):
    requests = []

    def handler(request):
        requests.append(request)
        return httpx.Response(200, json={"ok": True})

    TrackerApi(
        api_key="k",
        base_url="http://tracker.invalid",
        spool=tmp_path / "s.jsonl",
        transport=httpx.MockTransport(handler),
    )
    assert requests == []


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


class ThreadedServer:
    """A real HTTP server (wsgiref) for an app, on 127.0.0.1, in a thread."""

    def __init__(self, app, port: int = 0) -> None:
        self.httpd = make_server("127.0.0.1", port, app, handler_class=_Quiet)
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def test_an_outage_is_spooled_and_flushed_exactly_once(home, catalog, key, tmp_path, caplog):
    save_job_configs(catalog, JobConfigManager(README))
    spool = tmp_path / "spool.jsonl"
    server = ThreadedServer(tracker_app(home))
    tracker = TrackerApi(
        api_key=key, base_url=server.url, spool=spool, timeout=2, retries=1, backoff=0.01
    )
    job_id = new_id()
    job = tracker.create_job(provider_job_id=job_id, customer_id=142, tag="my_job")
    assert job.send_event(kind="step", tag="say_hello")["job"]["points_done"] == 10
    port = server.port
    server.stop()

    # The tracker is down: nothing raises, everything waits in the spool, in order.
    assert job.send_event(kind="step", tag="random_number", metadata={"n": 7}) is None
    assert job.send_event(kind="step", tag="random_number") is None  # a repeated step
    assert job.send_event(kind="step", tag="say_bye") is None
    assert job.send_event(kind="complete") is None
    spooled = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [e["body"].get("tag") for e in spooled] == [
        "random_number",
        "random_number",
        "say_bye",
        None,
    ]
    assert all(e["path"] == "/events" and e["body"]["event_id"] for e in spooled)
    assert key not in spool.read_text()
    assert "unreachable" in caplog.text
    assert get_job(catalog, job_id)["points_done"] == 10
    assert tracker.flush() == 4  # still down: all kept

    # Back up on the same data; the spool is sent, and sent again changes nothing.
    server = ThreadedServer(tracker_app(home), port=port)
    try:
        assert tracker.flush() == 0
        assert not spool.exists()
        for entry in spooled:  # as if every answer had been lost and all were resent
            resent = httpx.post(
                f"{server.url}/events", json=entry["body"], headers={"x-api_key": key}
            )
            assert resent.json()["event"]["duplicate"] is True
        found = get_job(catalog, job_id)
        assert (found["status"], found["progress"], found["points_done"]) == ("complete", 1.0, 35)
        ids = [e["event_id"] for e in found["events"]]
        assert len(ids) == len(set(ids)) == 5
        assert ids[1:] == [e["body"]["event_id"] for e in spooled]
        assert [e["points"] for e in found["events"]] == [10, 15, 0, 10, 0]
    finally:
        tracker.close()
        server.stop()


def test_each_request_first_sends_what_is_spooled(home, catalog, key, tmp_path):
    save_job_configs(catalog, JobConfigManager(README))
    spool = tmp_path / "spool.jsonl"
    server = ThreadedServer(tracker_app(home))
    port = server.port
    server.stop()
    tracker = TrackerApi(
        api_key=key,
        base_url=f"http://127.0.0.1:{port}",
        spool=spool,
        timeout=2,
        retries=0,
        cooldown=0,
    )
    # Even the job's creation waits in the spool, ahead of its events.
    job = tracker.create_job(provider_job_id="j", customer_id=None, tag="my_job")
    job.send_event(kind="step", tag="say_hello")
    assert len(spool.read_text().splitlines()) == 2
    server = ThreadedServer(tracker_app(home), port=port)
    try:
        answer = job.send_event(kind="step", tag="say_bye")
        assert answer["job"]["points_done"] == 20
        assert not spool.exists()
        assert [e["tag"] for e in get_job(catalog, "j")["events"]] == ["say_hello", "say_bye"]
    finally:
        tracker.close()
        server.stop()


def test_an_unresponsive_tracker_costs_a_timeout_not_the_job(tmp_path, caplog):
    # A socket that accepts connections but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        spool = tmp_path / "spool.jsonl"
        tracker = TrackerApi(
            api_key="k", base_url=url, spool=spool, timeout=0.3, retries=1, backoff=0.05
        )
        started = time.monotonic()
        job = tracker.create_job(provider_job_id="j", customer_id=1, tag="my_job")
        job.send_event(kind="step", tag="say_hello")
        job.send_event(kind="complete")
        elapsed = time.monotonic() - started
        tracker.close()
    assert elapsed < 3, elapsed  # one failed attempt with a retry, then straight to the spool
    assert len(spool.read_text().splitlines()) == 3
    assert "ReadTimeout" in caplog.text


def test_a_flush_leaves_other_trackers_requests_alone(home, catalog, key, tmp_path):
    """...and drops lines it cannot read."""
    save_job_configs(catalog, JobConfigManager(README))
    spool = tmp_path / "spool.jsonl"
    elsewhere = TrackerApi(
        api_key="k", base_url="http://127.0.0.1:9", spool=spool, timeout=0.5, retries=0
    )
    elsewhere.create_job(provider_job_id="x", customer_id=1, tag="my_job")
    kept = spool.read_text()
    with spool.open("a") as file:
        file.write('{"url": "half a line\n')  # as a crash mid-write could leave it
    with _tracker(tracker_app(home), key, spool) as tracker:
        tracker.create_job(provider_job_id="j", customer_id=1, tag="my_job")
        assert tracker.flush() == 0
    assert spool.read_text() == kept
    assert [j["provider_job_id"] for j in list_jobs(catalog)] == ["j"]


# ---------------------------------------------------------------- limits over real HTTP

SMALL_LIMITS = {
    "max_events": 4,
    "max_metadata_bytes": 200,
    "max_metadata_depth": 5,
    "page_size": 2,
    "max_page_size": 3,
}


@pytest.fixture
def limited_server(home, catalog):
    """``workbench serve`` with small [jobs] limits, the README's configuration saved."""
    path = home.home / "workbench.toml"
    lines = [ln for ln in path.read_text().splitlines() if ln.split(" =")[0] not in SMALL_LIMITS]
    settings = [f"{name} = {value}" for name, value in SMALL_LIMITS.items()]
    at = lines.index("[jobs]") + 1
    path.write_text("\n".join(lines[:at] + settings + lines[at:]) + "\n")
    save_job_configs(catalog, JobConfigManager(README))
    running = ServerProcess(home.home).start()
    yield running
    running.stop()


def test_job_limits_and_paging_over_the_real_server(limited_server, catalog, key):
    job_id = new_id()
    client = httpx.Client(
        base_url=limited_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )

    def event(event_id, kind="step", tag="say_hello", metadata=None):
        body = {"kind": kind, "tag": tag, "provider_job_id": job_id, "event_id": event_id}
        return client.post("/events", json={**body, "event_metadata": metadata})

    def refused(answer, status, code):
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/json"
        body = answer.json()
        assert (body["ok"], body["error"]) == (False, code) and body["message"]
        return body

    with client:
        created = client.post("/jobs", json={"provider_job_id": job_id, "tag": "my_job"})
        assert created.status_code == 200, created.text
        refused(event("deep", metadata=nested(6)), 400, "metadata_too_deep")
        refused(event("deeper", metadata=nested(300)), 400, "metadata_too_deep")
        refused(event("large", metadata={"x": "a" * 300}), 413, "metadata_too_large")
        for n in range(4):
            assert event(f"e{n}", metadata={"n": n}).status_code == 200
        full = refused(event("e4"), 413, "too_many_events")
        assert f"job '{job_id}' holds 4 events" in full["message"]
        assert event("done", kind="complete", tag=None).status_code == 200

        # The events, two at a time, following each answer's `next`.
        first = client.get(f"/jobs/{job_id}")
        assert first.status_code == 200
        job = first.json()["job"]
        assert (job["status"], job["progress"]) == ("complete", 1.0)
        pages, url = [], f"/jobs/{job_id}"
        while url is not None:
            answer = client.get(url).json()
            pages.append([e["event_id"] for e in answer["job"]["events"]])
            url = answer["next"]
        assert pages == [["e0", "e1"], ["e2", "e3"], ["done"]]
        three = client.get(f"/jobs/{job_id}", params={"limit": 3, "after": "e0"}).json()
        assert [e["event_id"] for e in three["job"]["events"]] == ["e1", "e2", "e3"]
        assert three["next"] == f"/jobs/{job_id}?after=e3&limit=3"
        for params in ({"limit": 4}, {"limit": 0}, {"limit": "all"}, {"after": "e9"}):
            bad = refused(client.get(f"/jobs/{job_id}", params=params), 400, "invalid_request")
            assert bad["field"] in params

        # An event stored before the depth limit existed: the job is still answered.
        with catalog.writing() as conn:
            conn.execute(
                tables.job_events.insert().values(
                    provider_job_id=job_id,
                    event_id="old",
                    kind="step",
                    tag="say_hello",
                    metadata=json.dumps(nested(300)),
                    points=0,
                    created_at=1,
                )
            )
        last = client.get(f"/jobs/{job_id}", params={"after": "done"})
        assert last.status_code == 200, last.text
        assert last.json()["job"]["events"][0]["metadata"] == nested(300)


def test_the_client_goes_on_when_the_real_server_refuses_an_event(
    limited_server, catalog, key, tmp_path, caplog
):
    spool = tmp_path / "spool.jsonl"
    with TrackerApi(api_key=key, base_url=limited_server.url, spool=spool, timeout=30) as tracker:
        job = tracker.create_job(provider_job_id="j", customer_id=142, tag="my_job")
        assert job.send_event(kind="step", tag="say_hello", metadata={"x": "a" * 300}) is None
        assert "event metadata of 309 bytes (as JSON) is over the limit" in caplog.text
        assert job.send_event(kind="step", tag="say_hello", metadata={"n": 1})["ok"] is True
        assert job.send_event(kind="complete")["job"]["progress"] == 1.0
    assert not spool.exists()  # refused is dropped, not resent
    assert [e["metadata"] for e in get_job(catalog, "j")["events"]] == [{"n": 1}, None]


# ---------------------------------------------------------------- the CLI


def run(home, *args):
    result = CliRunner().invoke(jobs, list(args), obj={"home": home.home})
    return result


def test_cli_load_list_show_and_apikey(home, catalog, config_file):
    loaded = run(home, "load", str(config_file))
    assert loaded.exit_code == 0, loaded.output
    assert loaded.output == "saved my_job (My Job): 3 steps, 35 points\n"
    assert run(home).output.startswith("no jobs yet")

    created = run(home, "apikey", "create", "--customer", "142")
    assert created.exit_code == 0
    key = created.stdout.strip()
    assert check_api_key(catalog, key) == "142"

    job_id = new_id()
    create_job(catalog, provider_job_id=job_id, customer_id=142, tag="my_job")
    record_event(catalog, provider_job_id=job_id, kind="step", tag="random_number", event_id="a")
    listed = run(home)
    assert listed.exit_code == 0, listed.output
    assert listed.output == f"[########............]  42%  my_job  {job_id}  running\n"

    shown = run(home, "show", job_id)
    assert shown.exit_code == 0, shown.output
    assert "15 of 35 points" in shown.output
    assert "[x] random_number" in shown.output and "[ ] say_hello" in shown.output
    assert "step     random_number" in shown.output

    assert json.loads(run(home, "show", job_id, "--json").output)["progress"] == 15 / 35
    assert [j["provider_job_id"] for j in json.loads(run(home, "--json").output)] == [job_id]


def test_cli_errors_are_one_line_with_exit_codes(home, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"job_configs": [{"name": "x", "tag": "x"}]}))
    loaded = run(home, "load", str(bad))
    assert loaded.exit_code == 2
    assert loaded.output.startswith(f"error: {bad}: $.job_configs[0]: 'step_configurations'")
    missing = run(home, "show", "nope")
    assert (missing.exit_code, missing.output) == (4, "error: no job 'nope'\n")
    versioned_file = tmp_path / "v1.json"
    versioned_file.write_text(json.dumps(versioned("1.0.0").as_dict()))
    assert run(home, "load", str(versioned_file)).output.startswith("saved my_job version 1.0.0 ")
    versioned_file.write_text(json.dumps(versioned("1.0.0", _steps(README)[:1]).as_dict()))
    changed = run(home, "load", str(versioned_file))
    assert changed.exit_code == 4
    assert changed.output == (
        "error: job configuration 'my_job' version '1.0.0' is already registered with other "
        "steps or another name; give the changed configuration a new version\n"
    )


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *(p for p, _ in _commands(jobs))], ids=" ".join)
def test_every_jobs_command_has_an_example(path):
    result = CliRunner().invoke(jobs, [*path, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"workbench jobs {' '.join(path)}".strip() in result.output


def test_the_default_spool_is_in_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tracker = TrackerApi("k", "http://127.0.0.1:9", timeout=0.5, retries=0)
    tracker.create_job(provider_job_id="j", customer_id=None, tag="my_job")
    tracker.close()
    spool = tmp_path / ".cache" / "workbench" / "tracker-spool.jsonl"
    assert json.loads(spool.read_text())["body"]["provider_job_id"] == "j"
    assert spool.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        (b"[" * 1000 + b"]" * 1000, "too deeply"),
        (b"1180591620717411303424", "signed 64-bit"),
        (b"1e400", "overflows a double"),
        (b'"\xff"', "not valid JSON"),
    ],
)
def test_hostile_json_on_the_job_api_is_a_400(api, key, configured, metadata, words):
    job = api.post(
        "/jobs",
        json={"provider_job_id": "hostile", "customer_id": 1, "tag": "my_job"},
        headers={"x-api_key": key},
    )
    assert job.status_code in (200, 201), job.text
    body = (
        b'{"kind": "step", "tag": "say_hello", "provider_job_id": "hostile", '
        b'"event_metadata": ' + metadata + b"}"
    )
    answer = api.post(
        "/events", content=body, headers={"x-api_key": key, "Content-Type": "application/json"}
    )
    assert answer.status_code == 400 and words in answer.json()["message"], answer.text
    assert api.get("/jobs/hostile", headers={"x-api_key": key}).status_code == 200
