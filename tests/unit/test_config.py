import re
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


# --------------------------------------------------------------- 0 and negatives

# Durations and counts where 0 is "there is none": None in the config.
ZERO_IS_NONE = ["boot_timeout", "retired_timeout", "busy_lag", "busy_retire_after", "block_report",
                "timeout", "header_timeout", "ws_send_timeout", "worker_memory", "cluster_memory",
                "max_requests", "limit_request_line", "limit_request_fields",
                "limit_request_field_size", "limit_request_body", "body_timeout", "ws_max_message"]
# 0 is a real amount: kept as 0.
ZERO_IS_ZERO = {"graceful_timeout": 0.0, "spawn_interval": 0.0, "health_retire_interval": 0.0,
                "keepalive": 0.0, "max_requests_jitter": 0, "retired_nice": 0}
DURATIONS = [s.name for s in config.SETTINGS if s.metavar == "DURATION"]
NUMBERS = DURATIONS + ["worker_memory", "cluster_memory", "max_requests", "max_requests_jitter",
                       "limit_request_line", "limit_request_fields", "limit_request_field_size",
                       "limit_request_body", "ws_max_message", "backlog", "worker_connections"]


def test_every_number_setting_is_classified():
    assert set(DURATIONS) <= set(ZERO_IS_NONE) | set(ZERO_IS_ZERO)
    for key in NUMBERS:
        if key in ("backlog", "worker_connections"):     # at least 1
            continue
        assert key in ZERO_IS_NONE or key in ZERO_IS_ZERO
        assert re.search(r"(?<![\d.])0(?![\d.%])", config.BY_NAME[key].doc), \
            f"{key}: its doc does not say what 0 means"


def _sources(tmp_path, key, raw):
    """(cli, environ, where the error must say it came from) for each source."""
    path = tmp_path / "neg.toml"
    path.write_text(f"{key} = {raw!r}\n".replace("'", '"') if isinstance(raw, str) else f"{key} = {raw}\n")
    flag = config.BY_NAME[key].flag
    env = config.BY_NAME[key].env
    yield {"app": "a:b", "config": str(path)}, {}, f"in {path}"
    yield {"app": "a:b"}, {env: str(raw)}, f"from environment {env}"
    yield {"app": "a:b", key: str(raw)}, {}, f"from command line {flag}"


@pytest.mark.parametrize("key", NUMBERS)
@pytest.mark.parametrize("raw", [-5, "-5", -1])
def test_negative_values_are_refused_naming_key_and_source(tmp_path, key, raw):
    for cli, environ, where in _sources(tmp_path, key, raw):
        with pytest.raises(ConfigError) as err:
            resolve(cli, environ=environ)
        message = str(err.value)
        assert message.startswith(f"{key} = ") and f"({where})" in message, message
        assert ("negative" in message or "at least" in message or "between" in message), message
        assert "\n" not in message


@pytest.mark.parametrize("key", DURATIONS)
@pytest.mark.parametrize("raw", ["-5s", "-500ms", " -2m ", "-0.5"])
def test_negative_duration_strings_say_negative(tmp_path, key, raw):
    for cli, environ, where in _sources(tmp_path, key, raw):
        with pytest.raises(ConfigError, match=f"^{key} = .*{where}.*: must not be negative$"):
            resolve(cli, environ=environ)


@pytest.mark.parametrize("raw", ["inf", "nan", "-inf"])
def test_non_finite_durations_are_refused(tmp_path, raw):
    path = write(tmp_path, f"timeout = {raw}\n")   # TOML has inf and nan
    with pytest.raises(ConfigError, match="timeout = .*finite"):
        resolve({"app": "a:b", "config": path}, environ={})


def test_negative_size_strings_say_negative():
    with pytest.raises(ValueError, match="negative"):
        parse_size("-5MiB")


@pytest.mark.parametrize("key", ZERO_IS_NONE)
@pytest.mark.parametrize("raw", [0, "0", "0s", "none"])
def test_zero_means_none_where_it_disables(tmp_path, key, raw):
    if raw == "0s" and key not in DURATIONS:
        raw = "0"
    for cli, environ, _ in _sources(tmp_path, key, raw):
        assert getattr(resolve(cli, environ=environ), key) is None


@pytest.mark.parametrize("key, zero", ZERO_IS_ZERO.items())
def test_zero_is_kept_where_it_is_an_amount(tmp_path, key, zero):
    for cli, environ, _ in _sources(tmp_path, key, 0):
        value = getattr(resolve(cli, environ=environ), key)
        assert value == zero and value is not None and type(value) is type(zero)


def test_disabled_limits_keep_their_defaults_when_unset():
    cfg = resolve({"app": "a:b"}, environ={})
    assert cfg.timeout == 30.0 and cfg.header_timeout == 10.0 and cfg.limit_request_line == 4094
    assert cfg.max_requests is None   # default 0: never


@pytest.mark.parametrize("raw, ok", [(-20, True), (19, True), (0, True), (-21, False), (20, False)])
def test_retired_nice_range(raw, ok):
    if ok:
        assert resolve({"app": "a:b", "retired_nice": str(raw)}, environ={}).retired_nice == raw
    else:
        with pytest.raises(ConfigError, match=r"^retired_nice = .*--retired-nice.*must be between -20 and 19$"):
            resolve({"app": "a:b", "retired_nice": str(raw)}, environ={})


@pytest.mark.parametrize("raw, ok", [(1, True), (65535, True), (0, False), (65536, False), (-1, False)])
def test_backlog_range(tmp_path, raw, ok):
    path = write(tmp_path, f"backlog = {raw}\n")
    if ok:
        assert resolve({"app": "a:b", "config": path}, environ={}).backlog == raw
    else:
        with pytest.raises(ConfigError, match=r"^backlog = .*must be between 1 and 65535$"):
            resolve({"app": "a:b", "config": path}, environ={})


def test_integer_bounds_messages():
    assert config.integer(0)("7") == 7
    with pytest.raises(ValueError, match="^must be at least 0$"):
        config.integer(0)(-1)
    with pytest.raises(ValueError, match="^must be at most 9$"):
        config.integer(None, 9)(10)
    with pytest.raises(ValueError, match="whole number"):
        config.integer(0)(1.5)
    with pytest.raises(ValueError, match="whole number"):
        config.integer(0)(True)


def test_docs_say_what_zero_means():
    docs = {s.name: s.doc for s in config.SETTINGS}
    assert "0: no hung-worker detection" in docs["timeout"]
    assert "0: keep-alive off" in docs["keepalive"]
    assert "CRLF not counted" in docs["limit_request_line"]
    assert "CRLF not counted" in docs["limit_request_field_size"]
    assert "0: they are stopped at once" in docs["graceful_timeout"]
