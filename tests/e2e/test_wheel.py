"""End-to-end test of the package as it is released (issue 11).

`python -m build` makes the sdist and, from it, the wheel (so the sdist is
known to be complete); a clean virtualenv (no system site-packages) installs
the wheel and its dependencies from the package index pip is configured
with; then the installed commands answer --version, and the installed
`ipserve` serves a request until the installed `ipservectl` stops it.

No namespace, no rule, no privilege: ipserve serves on 127.0.0.1 with the
reuseport router, so the test runs unprivileged too. It needs the index (a
mirror or PyPI) for the build backend and the dependencies. It takes about
10 s on a warm pip cache.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

import netns
import psutil
import pytest

import ipserve

pytest.importorskip("build", reason="needs `build` (pip install -e '.[test]')")

VERSION = ipserve.__version__
HELLO = os.path.join(netns.REPO_ROOT, "examples", "hello.py") + ":application"
# What a release is built from; copied, because a build writes ipserve.egg-info
# and build/ into its source tree, and the checkout is not the test's to change.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ipserve")
INSTALL_TIMEOUT = 600   # a cold pip cache downloads gevent and the rest


def clean_env() -> dict:
    """The caller's environment (the index settings included) without what
    would let the checkout stand in for the installed package."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IPSERVE_", "PYTHON", "VIRTUAL_ENV"))}
    if sys.prefix != sys.base_prefix:   # the checkout's virtualenv: off PATH
        ours = os.path.join(sys.prefix, "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if p != ours)
    return env


def run(argv: list[str], cwd: str, timeout: float = 120) -> str:
    result = subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="ips-wheel-")   # 0700, ours: fit for a runtime dir
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def started():
    """Processes the test starts: the master (a Popen) and the workers it
    reports (psutil.Process, which refuses to signal a reused pid)."""
    procs: dict[str, list] = {"masters": [], "workers": []}
    yield procs
    for master in procs["masters"]:
        if master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(15)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(5)
    for worker in procs["workers"]:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()


def build(workdir: str) -> tuple[str, str]:
    src, dist = os.path.join(workdir, "src"), os.path.join(workdir, "dist")
    for name in SOURCES:
        origin = os.path.join(netns.REPO_ROOT, name)
        if os.path.isdir(origin):
            shutil.copytree(origin, os.path.join(src, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            os.makedirs(src, exist_ok=True)
            shutil.copy2(origin, src)
    run([sys.executable, "-m", "build", "--outdir", dist, src], workdir, INSTALL_TIMEOUT)
    wheel = os.path.join(dist, f"ipserve-{VERSION}-py3-none-any.whl")
    sdist = os.path.join(dist, f"ipserve-{VERSION}.tar.gz")
    assert os.path.isfile(wheel) and os.path.isfile(sdist), os.listdir(dist)
    return wheel, sdist


def test_wheel_installs_and_serves(workdir, started):
    began = time.monotonic()
    wheel, sdist = build(workdir)

    with open(os.path.join(netns.REPO_ROOT, "LICENSE"), "rb") as fh:
        license_text = fh.read()
    with zipfile.ZipFile(wheel) as whl:
        assert whl.read(f"ipserve-{VERSION}.dist-info/licenses/LICENSE") == license_text
        assert "ipserve/dashboard.html" in whl.namelist()
        metadata = whl.read(f"ipserve-{VERSION}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert f"ipserve-{VERSION}/LICENSE" in names
    assert f"ipserve-{VERSION}/ipserve/dashboard.html" in names

    # A clean virtualenv: the base interpreter's, without its site-packages.
    venv = os.path.join(workdir, "venv")
    run([sys.executable, "-m", "venv", venv], workdir)
    bin_ = os.path.join(venv, "bin")
    run([os.path.join(bin_, "python"), "-m", "pip", "install", "-q", wheel], workdir,
        INSTALL_TIMEOUT)
    built = time.monotonic()

    assert run([os.path.join(bin_, "ipserve"), "--version"], workdir) == f"ipserve {VERSION}\n"
    assert run([os.path.join(bin_, "ipservectl"), "--version"], workdir) == f"ipserve {VERSION}\n"
    where = ("import importlib.resources as r, ipserve; print(ipserve.__file__); "
             "print(r.files('ipserve').joinpath('dashboard.html').is_file())")
    installed = run([os.path.join(bin_, "python"), "-c", where], workdir).split()
    assert installed[0].startswith(venv + os.sep) and installed[1] == "True", installed

    # Serve one request with the installed ipserve; stop it with ipservectl.
    port, name = free_port(), netns.unique_name("whl")
    runtime_dir = os.path.join(workdir, "run")
    os.mkdir(runtime_dir, 0o700)
    with open(os.path.join(workdir, "ipserve.log"), "wb") as log:
        master = subprocess.Popen(
            [os.path.join(bin_, "ipserve"), HELLO, "-w", "1", "-b", f"127.0.0.1:{port}",
             "--router", "reuseport", "--runtime-dir", runtime_dir, "-n", name],
            cwd=workdir, env=clean_env(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    started["masters"].append(master)

    def log_tail() -> str:
        with open(os.path.join(workdir, "ipserve.log"), errors="replace") as fh:
            return fh.read()[-3000:]

    deadline, answer = time.monotonic() + 60, None
    while answer is None:
        assert master.poll() is None, f"ipserve exited with {master.returncode}:\n{log_tail()}"
        assert time.monotonic() < deadline, f"no answer on port {port} in 60 s:\n{log_tail()}"
        try:
            answer = get(port)
        except OSError:
            time.sleep(0.2)
    status, body = answer
    assert status == 200 and body.startswith("Hello from worker pid "), answer
    worker = psutil.Process(int(re.search(r"pid (\d+)", body).group(1)))
    started["workers"].append(worker)
    # The worker runs the virtualenv's packages (gevent's extension is mapped
    # from there), not the checkout's environment.
    with open(f"/proc/{worker.pid}/maps") as fh:
        assert os.path.join(venv, "lib") in fh.read()

    out = run([os.path.join(bin_, "ipservectl"), "-n", name, "--runtime-dir", runtime_dir,
               "stop"], workdir)
    assert out.strip(), "ipservectl stop said nothing"
    assert master.wait(60) == 0, log_tail()
    psutil.wait_procs([worker], timeout=60)
    assert not worker.is_running(), "the worker outlived ipservectl stop"
    print(f"build + venv + install: {built - began:.1f} s; "
          f"total {time.monotonic() - began:.1f} s")
