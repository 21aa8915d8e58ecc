"""The commands as a user meets them (issue 11): --version, one-line usage
errors with a "did you mean" wherever a setting is named (option, file key,
environment variable, ipservectl subcommand), every default in --help, and
the signals epilog, the same as the README's table and the master's handlers.
"""

import json
import os
import re
import signal
import tomllib

import pytest

import ipserve
from ipserve import cli, config, ctl, errors
from ipserve.config import ConfigError, resolve

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def usage_error(main, argv, capsys) -> str:
    """Run an entry point that must refuse argv; its one stderr line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == errors.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# --------------------------------------------------------------- suggest()

def test_suggest_finds_the_near_miss_only():
    names = list(config.BY_NAME)
    assert config.suggest("wokers", names) == "workers"
    assert config.suggest("worker", names) == "workers"
    assert config.suggest("graceful_timout", names) == "graceful_timeout"
    assert config.suggest("threads", names) is None
    assert config.suggest("x", []) is None


# --------------------------------------------------------------- file and environment

def test_file_key_gets_did_you_mean(tmp_path):
    path = tmp_path / "ipserve.toml"
    path.write_text("wokers = 4\n")
    with pytest.raises(ConfigError) as err:
        resolve({"app": "a:b", "config": str(path)}, environ={})
    assert str(err.value) == f"unknown setting 'wokers' (in {path}); did you mean 'workers'?"


def test_far_off_file_key_gets_no_guess(tmp_path):
    path = tmp_path / "ipserve.toml"
    path.write_text("threads = 4\n")
    with pytest.raises(ConfigError) as err:
        resolve({"app": "a:b", "config": str(path)}, environ={})
    assert str(err.value) == f"unknown setting 'threads' (in {path})"


@pytest.mark.parametrize("var, meant", [
    ("IPSERVE_WOKERS", "IPSERVE_WORKERS"),
    ("IPSERVE_CONIFG", "IPSERVE_CONFIG"),
    ("IPSERVE_ROUTR", "IPSERVE_ROUTER"),
])
def test_environment_variable_gets_did_you_mean(var, meant):
    with pytest.raises(ConfigError) as err:
        resolve({"app": "a:b"}, environ={var: "4"})
    assert str(err.value) == f"unknown setting in environment variable {var}; did you mean {meant}?"


def test_far_off_environment_variable_gets_no_guess():
    with pytest.raises(ConfigError) as err:
        resolve({"app": "a:b"}, environ={"IPSERVE_THREADS": "4"})
    assert str(err.value) == "unknown setting in environment variable IPSERVE_THREADS"


# --------------------------------------------------------------- command line

@pytest.mark.parametrize("argv, expected", [
    (["--worker", "4", "a:b"], "unknown option --worker; did you mean --workers?"),
    (["--worker=4", "a:b"], "unknown option --worker; did you mean --workers?"),
    (["a:b", "--wrokers", "4"], "unknown option --wrokers; did you mean --workers?"),
    # A prefix is not accepted (allow_abbrev=False): the file and the
    # environment want whole names too.
    (["--graceful", "5", "a:b"], "unknown option --graceful; did you mean --graceful-timeout?"),
    (["--zzz", "a:b"], "unknown option --zzz"),
    (["--router", "nf", "a:b"], "argument --router: invalid choice: 'nf'; did you mean 'nft'?"),
    (["a:b", "c:d"], "unexpected argument(s): c:d"),
])
def test_ipserve_usage_errors_are_one_line(argv, expected, capsys):
    line = usage_error(cli.main, argv, capsys)
    assert line.startswith(f"ipserve: error: {expected}")
    assert line.endswith("(see ipserve --help)")


@pytest.mark.parametrize("argv, expected", [
    (["stat"], "invalid choice: 'stat'; did you mean 'status'?"),
    (["-n", "x", "stopp"], "invalid choice: 'stopp'; did you mean 'stop'?"),
    (["status", "--jsn"], "unknown option --jsn; did you mean --json?"),
    # Without the unknown option named first, argparse would complain of '3'.
    (["--time", "3", "status"], "unknown option --time; did you mean --timeout?"),
    (["status", "extra"], "unexpected argument(s): extra"),
    ([], "the following arguments are required: command"),
])
def test_ipservectl_usage_errors_are_one_line(argv, expected, capsys):
    line = usage_error(ctl.main, argv, capsys)
    assert expected in line and line.startswith("ipservectl: error: ")


def test_first_unknown_option_stops_at_double_dash_and_values():
    known = ["--workers", "--bind"]
    assert errors.first_unknown_option(["--workers", "2", "--nope=1"], known) == "--nope"
    assert errors.first_unknown_option(["--", "--nope"], known) is None
    assert errors.first_unknown_option(["--a value with spaces"], known) is None
    assert errors.first_unknown_option(["-x"], known) is None   # short ones: argparse says


# --------------------------------------------------------------- --version

@pytest.mark.parametrize("main", [cli.main, ctl.main])
def test_version_of_both_commands(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"ipserve {ipserve.version()}\n"


def test_version_is_the_distributions_unless_editable(monkeypatch):
    from importlib import metadata

    class Dist:
        version = "9.9.9"

        def __init__(self, direct_url):
            self.direct_url = direct_url

        def read_text(self, name):
            return self.direct_url if name == "direct_url.json" else None

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(None))
    assert ipserve.version() == "9.9.9"                       # a wheel install
    editable = json.dumps({"url": "file:///src", "dir_info": {"editable": True}})
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(editable))
    assert ipserve.version() == ipserve.__version__           # the tree's code runs

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    assert ipserve.version() == ipserve.__version__           # a bare source tree


@pytest.mark.parametrize("text, editable", [
    (None, False), ("", False), ("not json", False), ('["a list"]', False),
    ('{"url": "file:///x.whl", "archive_info": {}}', False),
    ('{"url": "file:///src", "dir_info": {"editable": true}}', True),
])
def test_is_editable(text, editable):
    assert ipserve.is_editable(text) is editable


def test_pyproject_takes_the_version_and_license_from_one_place():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ipserve.__version__"}
    assert project["project"]["license"] == "MIT"
    for name in project["project"]["license-files"]:
        with open(os.path.join(REPO, name)) as fh:
            assert fh.readline().strip() == "MIT License"


# --------------------------------------------------------------- --help

def test_help_gives_every_settings_default():
    for action in cli.build_parser()._actions:
        setting = config.BY_NAME.get(action.dest)
        if setting is None or setting.name == "app":
            continue
        assert "default" in action.help.lower(), setting.name
        assert action.help.endswith(f"[{setting.env}]"), setting.name


@pytest.mark.parametrize("name, shown", [
    ("graceful_timeout", "30s"), ("spawn_interval", "0.1s"), ("bind", "0.0.0.0:8000"),
    ("shed_load", "false"), ("limit_request_body", "100MiB"), ("backlog", "2048"),
    ("chdir", "unset"), ("router", "auto"),
])
def test_default_text(name, shown):
    assert cli.default_text(config.BY_NAME[name]) == shown
    # What --help shows is what the option takes back (a reader may paste it).
    if shown != "unset":
        config.BY_NAME[name].parse(shown)


def test_help_keeps_a_default_the_doc_already_gives():
    workers = config.BY_NAME["workers"]
    text = f"{workers.doc} [{workers.env}]"
    assert cli.help_with_default(text, workers) == text
    backlog = config.BY_NAME["backlog"]
    assert cli.help_with_default(f"Doc. [{backlog.env}]", backlog) == \
        f"Doc. Default: 2048. [{backlog.env}]"


def test_help_renders():
    text = cli.build_parser().format_help()
    assert "Default: 30s." in text and "signals to the master:" in text


# --------------------------------------------------------------- signals

def test_signals_are_the_ones_the_master_handles():
    from ipserve.master.loop import SIGNAL_ACTIONS

    assert {signal.Signals["SIG" + name] for name, _ in cli.SIGNALS} == set(SIGNAL_ACTIONS)
    assert len(cli.SIGNALS) == len(SIGNAL_ACTIONS)


def test_epilog_has_one_entry_per_signal():
    epilog = cli.signals_epilog()
    starts = [line.split()[0] for line in epilog.splitlines()[1:] if not line.startswith("   ")]
    assert starts == [name for name, _ in cli.SIGNALS]
    assert max(map(len, epilog.splitlines())) <= 79


def test_readme_signals_table_names_the_same_signals():
    with open(os.path.join(REPO, "README.md")) as fh:
        readme = fh.read()
    section = readme.split("### Signals", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([A-Z0-9]+)`", row.split("|")[1])}
    assert named == {name for name, _ in cli.SIGNALS}
