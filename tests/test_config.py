"""Finding and reading workbench.toml."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from workbench.cli import cli
from workbench.config import find_home, init_home, load_config
from workbench.errors import ConfigError


def test_home_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORKBENCH_HOME", raising=False)
    assert find_home() == tmp_path
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "env"))
    assert find_home() == tmp_path / "env"
    assert find_home(tmp_path / "flag") == tmp_path / "flag"


def test_init_writes_commented_config_and_pool(tmp_path):
    config = init_home(tmp_path / "lab")
    text = (tmp_path / "lab" / "workbench.toml").read_text()
    assert text.startswith("# workbench.toml")
    assert "[pool]" in text and "[catalog]" in text and "[server]" in text
    assert config.pool == tmp_path / "lab" / "pool"
    assert config.catalog_url == f"sqlite:///{tmp_path / 'lab' / 'pool' / 'catalog.sqlite'}"
    for folder in ("studies", "junk", "reports", "enrollment"):
        assert (config.pool / folder).is_dir()


def test_init_refuses_to_overwrite(tmp_path):
    init_home(tmp_path)
    with pytest.raises(ConfigError, match="exists already"):
        init_home(tmp_path)
    init_home(tmp_path, force=True)


def test_missing_config_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "study", "list"])
    assert result.exit_code == 2
    assert "no workbench.toml" in result.output and "workbench init" in result.output


def test_catalog_url_secret_comes_from_environment(tmp_path, monkeypatch):
    init_home(tmp_path)
    monkeypatch.setenv("WORKBENCH_CATALOG_URL", "postgresql+psycopg://u:secret@db/lab")
    assert load_config(tmp_path).catalog_url == "postgresql+psycopg://u:secret@db/lab"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[server\n", "cannot read"),
        ("[server]\nport = 0\n", "port must be a positive integer"),
        ("[server]\nspeed = 3\n", "unknown keys in [server]"),
        ("pool = 3\n", "[pool] must be a table"),
    ],
)
def test_bad_config_is_reported(tmp_path, text, message):
    (tmp_path / "workbench.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert message in info.value.message


def test_relative_pool_is_relative_to_the_home(tmp_path, monkeypatch):
    (tmp_path / "workbench.toml").write_text('[pool]\npath = "data/pool"\n')
    monkeypatch.chdir("/")
    assert load_config(tmp_path).pool == tmp_path / "data" / "pool"


def test_smtp_is_off_until_a_host_is_set(tmp_path, monkeypatch):
    config = init_home(tmp_path)
    assert config.smtp is None
    path = tmp_path / "workbench.toml"
    text = path.read_text()
    path.write_text(
        text.replace('host = ""', 'host = "mail.lab.example"').replace(
            "recipients = []", 'recipients = ["a@lab.example", "b@lab.example"]'
        )
    )
    monkeypatch.setenv("WORKBENCH_SMTP_PASSWORD", "s3cret")
    smtp = load_config(tmp_path).smtp
    assert smtp.host == "mail.lab.example" and smtp.recipients == ("a@lab.example", "b@lab.example")
    assert smtp.password == "s3cret"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('[smtp]\nhost = "m"\n', "recipients must list"),
        ('[smtp]\nhost = "m"\nrecipients = ["nobody"]\n', "recipients must list"),
        ('[smtp]\nhost = "m"\nrecipients = ["a@b.c"]\nport = 0\n', "port"),
        ('[smtp]\nhots = "m"\n', "unknown keys in \\[smtp\\]: hots"),
    ],
)
def test_bad_smtp_section_is_a_clear_error(tmp_path, section, message):
    (tmp_path / "workbench.toml").write_text(section)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        '[redis]\nurl_env = "LAB_REDIS"\n',
        '[pipelines]\nredis_url_env = "LAB_REDIS"\n',  # a home made before [redis]
        '[sync]\nredis_url_env = "LAB_REDIS"\n',
        '[pipelines]\nredis_url_env = "LAB_REDIS"\n[sync]\nredis_url_env = "LAB_REDIS"\n',
    ],
)
def test_one_redis_url_serves_the_queue_and_the_rate_limits(tmp_path, monkeypatch, text):
    from workbench.sync.settings import sync_settings

    (tmp_path / "workbench.toml").write_text(text)
    monkeypatch.setenv("LAB_REDIS", "redis://127.0.0.1:6390/0")
    config = load_config(tmp_path)
    assert config.redis_url == "redis://127.0.0.1:6390/0"
    sync_settings(config)  # the older key is not an unknown [sync] key


def test_two_different_redis_variables_are_refused(tmp_path):
    (tmp_path / "workbench.toml").write_text(
        '[pipelines]\nredis_url_env = "A"\n[sync]\nredis_url_env = "B"\n'
    )
    with pytest.raises(ConfigError, match=r"set \[redis\] url_env"):
        load_config(tmp_path)
