import ast
import os
import pathlib
import shutil
import subprocess

import pytest

from ipserve import config, names
from ipserve.config import ConfigError, resolve
from ipserve.routing import iptables, nft

REFUSED = [
    "x;table inet mine;delete table inet mine",   # nft injection
    "x table inet mine",
    "x\ndelete table inet mine",
    "x{", "x}", "x'", 'x"', "x$(id)", "x`id`", "x|y", "x&y", "x#y", "x*", "x\\y",
    "../../tmp/victim",                            # path traversal
    "../victim", "/tmp/victim", "a/b", "..", ".", ".hidden",
    "-n", "_x", "", " ", "web ", " web", "web\t", "x\x00y",
    "wéb", "ｗeb",                                  # non-ASCII letters and digits
    "٣",
]


@pytest.mark.parametrize("name", REFUSED)
def test_bad_names_are_refused_with_a_one_line_reason(name):
    with pytest.raises(ValueError) as err:
        names.validate(name)
    assert str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", REFUSED)
def test_kernel_names_refuse_bad_names_too(name):
    with pytest.raises(ValueError):
        names.nft_table(name)
    with pytest.raises(ValueError):
        names.iptables_chain(name)


@pytest.mark.parametrize("name", ["web", "web-1", "web.1", "web_1", "1", "ipserve-8000",
                                  "A.b-C_9", "x" * 24])
def test_good_names_are_kept_as_given(name):
    assert names.validate(name) == name


def test_length_24_accepted_25_refused():
    assert names.validate("a" * 24) == "a" * 24
    with pytest.raises(ValueError, match="24"):
        names.validate("a" * 25)
    assert len(names.iptables_chain("a" * 24)) == 28   # the kernel's limit for a chain


def test_reasons():
    with pytest.raises(ValueError, match="';'"):
        names.validate("x;y")
    with pytest.raises(ValueError, match="start with a letter or a digit"):
        names.validate("-x")
    with pytest.raises(ValueError, match="empty"):
        names.validate("")


@pytest.mark.parametrize("value", [None, 5, 1.5, b"web", ["web"], True])
def test_names_must_be_str(value):
    with pytest.raises(ValueError, match="string"):
        names.validate(value)


def test_distinct_names_give_distinct_tables_and_chains():
    variants = ["web-1", "web.1", "web_1"]
    assert [names.nft_table(n) for n in variants] == ["ipserve_web-1", "ipserve_web.1", "ipserve_web_1"]
    assert [names.iptables_chain(n) for n in variants] == ["IPS-web-1", "IPS-web.1", "IPS-web_1"]
    for n in variants:
        assert nft.table_name(n) == names.nft_table(n)
        assert iptables.chain_name(n) == names.iptables_chain(n)


def test_config_uses_the_same_rule():
    assert resolve({"app": "a:b", "name": "web.1"}, environ={}).name == "web.1"
    for bad in REFUSED[:3] + ["../../tmp/victim", "a" * 25]:
        with pytest.raises(ConfigError) as err:
            resolve({"app": "a:b", "name": bad}, environ={})
        message = str(err.value)
        assert message.startswith(f"name = {bad!r} (from command line --name): ")
        assert "\n" not in message
    with pytest.raises(ConfigError, match="IPSERVE_NAME"):
        resolve({"app": "a:b"}, environ={"IPSERVE_NAME": "x;y"})
    assert config.parse_name("web-1") == "web-1"


def test_names_imports_nothing_from_ipserve():
    source = pathlib.Path(names.__file__).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "ipserve" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and (node.module or "").split(".")[0] != "ipserve"


def _nft_in_throwaway_namespace() -> tuple[list[str], str]:
    """argv prefix running a command in a new user + network namespace, where
    nft may write tables without root; the namespace dies with the command."""
    nft_bin = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft")
                                           if os.access(p, os.X_OK)), None)
    unshare = shutil.which("unshare")
    if not nft_bin or not unshare:
        pytest.skip("needs nft and unshare")
    probe = subprocess.run([unshare, "-rn", nft_bin, "list", "tables"], capture_output=True,
                           text=True, timeout=20)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged user+network namespace for nft here: {probe.stderr.strip()}")
    return [unshare, "-rn", "sh", "-ec"], nft_bin


def test_nft_loads_separate_tables_for_web_dash_dot_underscore(tmp_path):
    """The kernel (not just our renderer) takes '-' and '.' in table names, and
    removing one instance's table leaves the others'."""
    prefix, nft_bin = _nft_in_throwaway_namespace()
    v4, v6 = config.parse_bind("0.0.0.0:8000"), config.parse_bind("[::]:8000")
    variants = ["web-1", "web.1", "web_1"]
    files = []
    for i, name in enumerate(variants):
        path = tmp_path / f"{i}.nft"
        path.write_text(nft.render_table(name, [v4, v6], {0: 9000 + i, 1: 9100 + i}))
        files.append(str(path))
    removal = tmp_path / "remove.nft"
    removal.write_text(nft.render_remove("web-1"))
    script = "; ".join([f'"$0" -f {f}' for f in files]
                       + ['"$0" list tables', 'echo ---', f'"$0" -f {files[0]}',   # replace
                          f'"$0" -f {removal}', '"$0" list tables'])
    result = subprocess.run(prefix + [script, nft_bin], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.split("---")
    assert sorted(before.split("\n")) == sorted(
        [""] + [f"table {fam} ipserve_{n}" for n in variants for fam in ("ip", "ip6")])
    assert sorted(after.split()) == sorted(" ".join(
        f"table {fam} ipserve_{n}" for n in ("web.1", "web_1") for fam in ("ip", "ip6")).split())
