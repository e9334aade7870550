"""trackerapi as a drop-in: the published client's requests, and its README's flow with the
workbench's own client, against ``workbench serve`` on 127.0.0.1.

The published client (``trackerapi/`` of the 002_ImagePro project, May 2023) is not on PyPI,
so its requests are replayed here exactly as its code builds them: ``requests`` with
``json=`` bodies and its one header, ``x-api_key``; ``register_job_config`` sends pydantic's
``config.dict()`` of one configuration (fields in declaration order: ``tag``, ``name``,
``step_configurations``, ``version``; a step's ``tag``, ``points``, ``name``); it reads
``provider_job_id`` from the answer to ``POST /jobs`` and ``id`` from the answer to
``POST /events``, and treats any answer but 200 to a POST as a failure.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, ServerProcess
from tests.test_jobs import README_FILE  # the trackerapi README's configurations, verbatim
from workbench.jobs import create_api_key, get_job, list_job_configs, list_jobs

# The trackerapi README's job script (Part B, step 3), verbatim but for the import, which
# names the workbench's module, and the two placeholders, which the test fills in.
README_SCRIPT = """\
import sys
import random
import uuid

# NEW IMPORT
from workbench.tracker import JobConfigManager, TrackerApi

def my_job(name):
    job_config_manager = JobConfigManager(configurations_file="./job_configurations.json")
    job_config = job_config_manager.get_job_config("my_job")

    tracker = TrackerApi(api_key="<your api key>", base_url="<url for tracker app backend>")

    # Create a unique ID for the job
    id = str(uuid.uuid4())
    tracker_job = tracker.create_job(provider_job_id=id, customer_id=142, tag=job_config.name)

    # Do the first step (The say_hello step)
    message = f"Hello {name}!"
    print(message)
    tracker_job.send_event(kind="step", name=job_config.step_configurations[0].tag, metadata={ "Message": message })

    # Do the second step (The random_number step)
    random_number = random.randint(0, 100)
    print("Random Number", random_number)
    tracker_job.send_event(kind="step", name=job_config.step_configurations[1].tag, metadata={ "Random Number": random_number })

    # Do the last step (The say_bye step)
    message = f"Bye {name}!"
    print(message)
    tracker_job.send_event(kind="step", name=job_config.step_configurations[2].tag, metadata={ "Message": message })


if __name__ == "__main__":
    arg = sys.argv[1]

    if not arg:
        raise Exception("You need to provide a name as input to continue!")
    my_job(arg)
"""

TIMEOUT = 60  # seconds per request: the machine may be loaded


@pytest.fixture
def tracker_server(home, catalog):
    """``workbench serve`` for a home whose catalog knows no job configuration."""
    running = ServerProcess(home.home).start()
    yield running
    running.stop()


class ReplayedTrackerApi:
    """The requests trackerapi's ``TrackerApi`` (May 2023) sends, built as its code builds them."""

    def __init__(self, api_key: str, base_url: str) -> None:
        self.headers = {"x-api_key": api_key}
        self.base_url = base_url
        # __init__ -> verify_api_key(): GET, raise_for_status()
        self.get("/api-keys/protected").raise_for_status()

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.base_url}{path}", headers=self.headers, timeout=TIMEOUT)

    def post(self, path: str, data: dict) -> requests.Response:
        return requests.post(
            f"{self.base_url}{path}", json=data, headers=self.headers, timeout=TIMEOUT
        )

    def register_job_config(self, config: dict) -> requests.Response:
        # self.__post(self.urls.jobs_config_url, config.dict())
        return self.post("/job_configurations", config)

    def create_job(self, provider_job_id: str, customer_id: int, tag: str) -> str:
        body = {"provider_job_id": provider_job_id, "customer_id": customer_id, "tag": tag}
        answer = self.post("/jobs", body)
        assert answer.status_code == 200, answer.text
        return answer.json()["provider_job_id"]  # TrackerJobApi(provider_job_id=data[...])

    def send_event(self, kind: str, tag: str, provider_job_id: str, metadata: dict) -> object:
        body = {
            "kind": kind,
            "tag": tag,
            "provider_job_id": provider_job_id,
            "event_metadata": metadata,
        }
        answer = self.post("/events", body)
        assert answer.status_code == 200, answer.text
        return answer.json()["id"]  # TrackerEventApi(event_id=data["id"])


def pydantic_dict(config: dict, version: str) -> dict:
    """``JobConfig(**config, version=version).dict()`` as pydantic v1 orders its fields."""
    return {
        "tag": config["tag"],
        "name": config["name"],
        "step_configurations": [
            {"tag": s["tag"], "points": s["points"], "name": s["name"]}
            for s in config["step_configurations"]
        ],
        "version": version,
    }


def test_the_published_client_runs_its_readme_flow_to_100_percent(tracker_server, catalog):
    key = create_api_key(catalog)
    url = tracker_server.url
    readme = json.loads(README_FILE)["job_configs"][0]
    config = pydantic_dict(readme, "1.0.0")

    # The constructor checks the key: a wrong one fails there, as trackerapi expects.
    with pytest.raises(requests.HTTPError) as refused:
        ReplayedTrackerApi("not a key", url)
    assert refused.value.response.status_code == 401
    assert refused.value.response.json()["error"] == "unauthorized"

    # A job script of the README's kind, run twice: each run registers its configuration.
    for run in range(2):
        tracker = ReplayedTrackerApi(key, url)
        registered = tracker.register_job_config(config)
        assert registered.status_code == 200, registered.text  # any other code is a failure
        assert registered.json() == {
            "ok": True,
            "saved": ["my_job"],
            "tag": "my_job",
            "version": "1.0.0",
        }
        job_id = str(uuid.uuid4())
        # The README passes the configuration's name as the tag.
        assert tracker.create_job(provider_job_id=job_id, customer_id=142, tag="My Job") == job_id
        ids = [
            tracker.send_event("step", step["tag"], job_id, {"Message": f"run {run}"})
            for step in config["step_configurations"]
        ]
        assert len(set(ids)) == 3 and all(isinstance(i, str) and i for i in ids)

        shown = tracker.get(f"/jobs/{job_id}")
        assert shown.status_code == 200
        job = shown.json()["job"]
        assert (job["tag"], job["customer_id"], job["progress"]) == ("my_job", "142", 1.0)
        assert [e["event_id"] for e in job["events"]] == ids
        assert [s["done"] for s in job["steps"]] == [True, True, True]

    # The same tag and version with other steps is refused, not silently replaced.
    changed = {**config, "step_configurations": config["step_configurations"][:2]}
    conflict = tracker.register_job_config(changed)
    assert conflict.status_code == 409
    body = conflict.json()
    assert (body["ok"], body["error"], body["tag"], body["version"]) == (
        False,
        "job_config_conflict",
        "my_job",
        "1.0.0",
    )
    assert "give the changed configuration a new version" in body["message"]
    [saved] = list_job_configs(catalog)
    assert (saved.version, saved.total_points) == ("1.0.0", 35)

    # A new version is taken for new jobs; the jobs of 1.0.0 keep their steps.
    assert tracker.register_job_config({**changed, "version": "1.1.0"}).status_code == 200
    newer = tracker.create_job(provider_job_id="after-1.1", customer_id=142, tag="my_job")
    assert get_job(catalog, newer)["points_total"] == 25
    assert all(j["points_total"] == 35 for j in list_jobs(catalog) if j["provider_job_id"] != newer)


def test_the_readme_job_script_runs_as_written_with_the_workbench_client(
    tracker_server, catalog, tmp_path
):
    key = create_api_key(catalog)
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "job_configurations.json").write_text(README_FILE)
    script = README_SCRIPT.replace("<your api key>", key).replace(
        "<url for tracker app backend>", tracker_server.url
    )
    (folder / "my_job.py").write_text(script)
    assert list_job_configs(catalog) == []  # nobody ran `workbench jobs load`

    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "my_job.py", "John"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello John!\nRandom Number ")
    assert "refused" not in done.stderr and "spooled" not in done.stderr, done.stderr

    [config] = list_job_configs(catalog)  # registered by the client
    assert (config.tag, config.total_points) == ("my_job", 35)
    [listed] = list_jobs(catalog)
    job = get_job(catalog, listed["provider_job_id"])
    assert (job["tag"], job["customer_id"], job["progress"]) == ("my_job", "142", 1.0)
    assert [e["tag"] for e in job["events"]] == ["say_hello", "random_number", "say_bye"]
    assert job["events"][0]["metadata"] == {"Message": "Hello John!"}
    assert not (tmp_path / ".cache" / "workbench" / "tracker-spool.jsonl").exists()


def test_the_client_and_manager_come_from_one_light_module():
    from workbench import jobs, tracker
    from workbench.tracker import JobConfigManager, TrackerApi

    assert JobConfigManager is jobs.JobConfigManager and TrackerApi is tracker.TrackerApi
    # A job script imports workbench.tracker: it brings neither the catalog nor SQLAlchemy.
    tree = ast.parse(Path(tracker.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names} == {
        "httpx",
        "workbench.errors",
        "workbench.templates",
    }
