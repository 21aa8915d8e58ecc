"""A small headless-Chromium driver for the end-to-end tests: the DevTools
protocol (CDP) over websocket-client, no other dependency.

Chromium runs under ``ip netns exec <ns>`` (or in this namespace, ns=None), so
``http://127.0.0.1:<port>/`` in its address bar is that namespace's loopback,
where the admin endpoint under test listens. Its DevTools endpoint
(``--remote-debugging-port=0``: the port it picked is written to
``<profile>/DevToolsActivePort``) is on that same loopback; the driver reaches
it with sockets created inside the namespace (netns.tcp_connect enters it for
the socket() call only, the calling thread comes straight back), so neither a
helper process nor a second address is needed, and nothing listens outside
the namespace.

Chromium is started in a session of its own: close() kills that whole process
group (by the pid started here, before reaping it, so the group id cannot be
reused meanwhile), waits until no member is left, and removes the profile
directory, even after a failure.

    with Browser(ns) as browser:
        browser.navigate("http://127.0.0.1:9000/")
        browser.wait_for("document.body.dataset.renders > 0", 30, "a first render")
        browser.screenshot("page.png")
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Self

import netns

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-background-networking", "--disable-sync", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--mute-audio", "--force-device-scale-factor=1")


class BrowserError(RuntimeError):
    pass


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_missing() -> str | None:
    """Why no browser test can run here, or None."""
    if chromium_path() is None:
        return ("chromium is not installed (apt-get install chromium); "
                "the dashboard's browser tests need it")
    return None


def _group_members(pgid: int) -> list[int]:
    """Pids whose process group is `pgid` and which have not exited yet."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


class Browser:
    """One headless Chromium with one page, driven over CDP."""

    def __init__(self, ns: str | None = None, width: int = 1400, height: int = 1000,
                 timeout: float = 30):
        why = chromium_missing()
        if why:
            raise BrowserError(why)
        self.ns = ns
        self.timeout = timeout
        self.exceptions: list[str] = []      # uncaught page errors (Runtime.exceptionThrown)
        self.console_errors: list[str] = []
        self._next_id = 0
        self.ws = None
        self.profile = tempfile.mkdtemp(prefix="ips-chromium-")
        # Chromium's output, for error messages; open for the browser's whole life.
        self._log = open(os.path.join(self.profile, "chromium.log"), "wb")  # noqa: SIM115
        try:
            self.proc = netns.run_in(ns, [chromium_path(), *FLAGS, f"--user-data-dir={self.profile}",
                                          f"--window-size={width},{height}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self._log.close()
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        try:
            self._attach()
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # -- start-up --
    def _devtools_port(self) -> int:
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError), open(path) as f:
                return int(f.read().splitlines()[0])
            if self.proc.poll() is not None:
                raise self.error(f"chromium exited with status {self.proc.returncode} at start")
            if time.monotonic() > deadline:
                raise self.error(f"chromium wrote no DevToolsActivePort within {self.timeout}s")
            time.sleep(0.05)

    def _attach(self) -> None:
        import websocket  # websocket-client

        port = self._devtools_port()
        deadline = time.monotonic() + self.timeout
        while True:
            status, _, body = netns.http_get(self.ns, None, "127.0.0.1", port, "/json/list",
                                             timeout=self.timeout)
            pages = [t for t in json.loads(body) if t.get("type") == "page"] if status == 200 else []
            if pages:
                break
            if time.monotonic() > deadline:
                raise self.error(f"chromium shows no page target (HTTP {status}: {body[:300]!r})")
            time.sleep(0.05)
        sock = netns.tcp_connect(self.ns, None, "127.0.0.1", port, timeout=self.timeout)
        try:
            # No Origin header: Chromium refuses DevTools WebSockets from origins
            # not given in --remote-allow-origins.
            self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], socket=sock,
                                                  timeout=self.timeout, suppress_origin=True)
        except BaseException:
            sock.close()
            raise

    # -- the protocol --
    def send(self, method: str, timeout: float | None = None, **params) -> dict:
        """One CDP command; returns its result, raises BrowserError on a CDP error.
        Events read meanwhile are noted (page exceptions, console errors)."""
        self._next_id += 1
        msg_id = self._next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        self.ws.settimeout(timeout or self.timeout)
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise self.error(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            desc = details.get("exception", {}).get("description") or details.get("text")
            self.exceptions.append(str(desc))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(" ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", timeout=timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise self.error(f"evaluate {expression[:80]!r}: "
                             f"{details.get('exception', {}).get('description') or details.get('text')}")
        return result.get("result", {}).get("value")

    # -- pages --
    def navigate(self, url: str, timeout: float | None = None) -> None:
        """Open `url` and wait until its document has loaded."""
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise self.error(f"navigate {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout or self.timeout,
                      f"{url} to load")

    def wait_for(self, expression: str, timeout: float, what: str, interval: float = 0.1) -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise self.error(f"timed out after {timeout}s waiting for {what} "
                                 f"({expression[:120]!r} is {value!r}); page text:\n"
                                 f"{self.text()[:3000]}")
            time.sleep(interval)

    def text(self) -> str:
        """What a person reads: document.body.innerText."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: str, full_page: bool = True) -> str:
        """Save a PNG of the page (all of it with full_page, else the viewport)."""
        params: dict = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", **params)["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    # -- teardown --
    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(os.path.join(self.profile, "chromium.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")[-chars:]
        except OSError as exc:
            return f"(no chromium log: {exc})"

    def error(self, message: str) -> BrowserError:
        return BrowserError(f"{message}\nchromium log, last lines:\n{self.log_tail()}")

    def close(self) -> None:
        """Kill chromium's whole process group, remove its profile. Idempotent."""
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
            self.ws = None
        proc = getattr(self, "proc", None)
        if proc is not None and proc.returncode is None:
            # Still our unreaped child: its pid, hence its group id, is ours.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
