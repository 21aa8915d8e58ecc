import socket

import pytest

from ipserve import config
from ipserve.config import ConfigError, parse_bind, parse_duration, parse_size, resolve


def write(tmp_path, text):
    path = tmp_path / "ipserve.toml"
    path.write_text(text)
    return str(path)


def test_defaults():
    cfg = resolve({"app": "a:b"}, environ={})
    assert cfg.workers == config.default_workers()
    assert [str(b) for b in cfg.bind] == ["0.0.0.0:8000"]
    assert cfg.name == "ipserve-8000"
    assert cfg.graceful_timeout == 30.0
    assert cfg.pid.endswith("ipserve-8000.pid")
    assert cfg.sources["workers"] == "default"


def test_precedence_file_env_cli(tmp_path):
    path = write(tmp_path, 'workers = 2\nlog_level = "debug"\ngraceful_timeout = "5s"\n')
    env = {"IPSERVE_WORKERS": "4", "IPSERVE_GRACEFUL_TIMEOUT": "500ms"}
    cfg = resolve({"app": "a:b", "config": path, "workers": "8"}, environ=env)
    assert cfg.workers == 8 and "command line --workers" in cfg.sources["workers"]
    assert cfg.graceful_timeout == 0.5 and "IPSERVE_GRACEFUL_TIMEOUT" in cfg.sources["graceful_timeout"]
    assert cfg.log_level == "debug" and path in cfg.sources["log_level"]


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, 'app = "x:y"\n')
    assert resolve({}, environ={"IPSERVE_CONFIG": path}).app == "x:y"


@pytest.mark.parametrize("text, words", [
    ("workers = 3\n", ["workers = 3", "power of two"]),
    ('workers = "many"\n', ["workers = 'many'", "whole number"]),
    ("wokers = 2\n", ["unknown setting 'wokers'"]),
    ('bind = "nowhere"\n', ["bind = 'nowhere'", "HOST:PORT"]),
    ('bind = "1.2.3.4:99999"\n', ["between 1 and 65535"]),
    ('graceful_timeout = "soon"\n', ["graceful_timeout", "duration"]),
    ('router = "pf"\n', ["router = 'pf'", "one of"]),
    ("[section]\nworkers = 2\n", ["keys are flat"]),
    ("workers = \n", ["not valid TOML"]),
])
def test_file_errors_name_key_value_and_file(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        resolve({"app": "a:b", "config": path}, environ={})
    message = str(err.value)
    for word in words:
        assert word in message
    if "TOML" not in message:
        assert path in message
    assert "\n" not in message


def test_env_errors_name_the_variable():
    with pytest.raises(ConfigError, match="IPSERVE_WORKERS"):
        resolve({"app": "a:b"}, environ={"IPSERVE_WORKERS": "6"})
    with pytest.raises(ConfigError, match="IPSERVE_NOPE"):
        resolve({"app": "a:b"}, environ={"IPSERVE_NOPE": "1"})


def test_cli_errors_name_the_flag():
    with pytest.raises(ConfigError, match="command line --workers"):
        resolve({"app": "a:b", "workers": "0"}, environ={})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        resolve({"app": "a:b", "config": "/nonexistent/x.toml"}, environ={})


def test_missing_app():
    with pytest.raises(ConfigError, match="no APP"):
        resolve({}, environ={})


def test_durations_and_sizes():
    assert parse_duration("30s") == 30 and parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120 and parse_duration(7) == 7
    assert parse_size("448MiB") == 448 * 1024**2 and parse_size("1k") == 1000
    assert parse_size(1024) == 1024
    for bad in ("fast", "-1s", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size("12 parsecs")


def test_binds():
    assert parse_bind("0.0.0.0:80") == config.Bind("0.0.0.0", 80, socket.AF_INET)
    assert parse_bind("[::]:8000") == config.Bind("::", 8000, socket.AF_INET6)
    assert parse_bind("8080").host == "0.0.0.0"
    assert parse_bind("localhost:80").host == "127.0.0.1"
    assert str(parse_bind("[fd00::1]:80")) == "[fd00::1]:80"
    with pytest.raises(ValueError):
        parse_bind("example.com:80")
    with pytest.raises(ValueError):
        config.parse_binds(["0.0.0.0:80", "[::]:81"])


def test_bind_list_from_cli_and_file(tmp_path):
    path = write(tmp_path, 'bind = ["0.0.0.0:9000", "[::]:9000"]\n')
    cfg = resolve({"app": "a:b", "config": path}, environ={})
    assert [b.family for b in cfg.bind] == [socket.AF_INET, socket.AF_INET6]
    assert cfg.name == "ipserve-9000"
    cfg = resolve({"app": "a:b", "bind": ["127.0.0.1:7000"]}, environ={})
    assert [str(b) for b in cfg.bind] == ["127.0.0.1:7000"]


def test_name_is_checked():
    with pytest.raises(ConfigError, match="name"):
        resolve({"app": "a:b", "name": "bad name;"}, environ={})


def test_shipped_conf_documents_every_setting():
    """conf/ipserve.toml is generated from the settings table; keep it so."""
    from pathlib import Path

    shipped = (Path(__file__).parents[2] / "conf" / "ipserve.toml").read_text()
    assert shipped.strip() == config.render_toml_docs().strip()


def test_optional_limits_accept_none_and_zero(tmp_path):
    path = write(tmp_path, 'worker_memory = "512MiB"\nretired_timeout = 0\naccess_log = ""\n')
    cfg = resolve({"app": "a:b", "config": path}, environ={"IPSERVE_CLUSTER_MEMORY": "none"})
    assert cfg.worker_memory == 512 * 1024**2
    assert cfg.retired_timeout is None and cfg.access_log is None and cfg.cluster_memory is None


def test_help_lists_every_setting():
    from ipserve.cli import build_parser

    text = build_parser().format_help()
    for s in config.SETTINGS:
        if s.name != "app":
            assert s.flag in text and s.env in text
