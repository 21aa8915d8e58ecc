"""Worker entry point: `python -m ipserve.worker SPEC_JSON` (spawned by the master)
or `python -m ipserve.worker --check APP [CHDIR]` (the master's pre-flight import).

gevent's monkey-patching comes first, before the application is imported.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import faulthandler  # noqa: E402
import resource  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

import ipserve  # noqa: E402

from ipserve import app as app_loader  # noqa: E402
from ipserve import logs  # noqa: E402
from ipserve.control import LineReader, encode  # noqa: E402
from ipserve.worker.lag import HubLagMeter  # noqa: E402
from ipserve.worker.server import Limits, Server  # noqa: E402


RETIRE_ACCEPT_GRACE = 1.0


def check_app(spec: str, chdir: str | None) -> int:
    try:
        app_loader.load(spec, chdir)
    except app_loader.AppError as exc:
        print(f"ipserve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def close_websocket(ws, code: int, reason: bytes) -> None:
    """Send a close frame carrying `code` and `reason`, and mark `ws` closed.

    gevent-websocket 0.10's WebSocket.close(code, message) drops `code` and
    sends str(message) as the whole payload (b"x" goes out as "b'x'", which a
    client reads as close code 25127), so the frame (RFC 6455 5.5.1) is built here."""
    if ws.closed:
        return
    try:
        ws.send_frame(struct.pack("!H", code) + reason, ws.OPCODE_CLOSE)
    finally:
        ws.closed = True


class Worker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.name = spec["name"]
        self.slot = spec["slot"]
        self.generation = spec["generation"]
        self.log = logs.setup_error_log(spec["error_log"], spec["log_level"])
        self.access_log = logs.setup_access_log(spec["access_log"])
        self.servers: list[Server] = []
        self.port = 0
        self.state = "booting"
        self.lag = HubLagMeter(busy_lag_ms=spec["busy_lag"] * 1000.0)
        ipserve._lag_meter = self.lag
        self.link = None          # socket to the master, when connected
        self.started = time.time()

    # -------------------------------------------------------------- start-up
    def diagnostics(self) -> None:
        """Stacks on SIGABRT (the master sends it to a hung worker before
        SIGKILL), and gevent's report of whatever blocks the hub longer than
        block_report (its "Blocked Stack" names the code), both in the error log."""
        stream = self.log.handlers[0].stream
        faulthandler.enable(file=stream, all_threads=True)  # SIGABRT, SIGSEGV, ...: dump, then die
        gevent.config.monitor_thread = True
        gevent.config.max_blocking_time = self.spec["block_report"]
        hub = gevent.get_hub()
        hub.exception_stream = stream
        hub.start_periodic_monitoring_thread()

    def run(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # one process holds thousands of long-lived connections
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.diagnostics()
        application = app_loader.load(self.spec["app"], self.spec.get("chdir"))
        # The master opened our listening sockets and keeps a copy: if we die,
        # connections wait in the backlog for our replacement instead of
        # being refused.
        listeners = [socket.socket(fileno=fd) for fd in self.spec["listen_fds"]]
        self.port = listeners[0].getsockname()[1]
        worker_info = {"slot": self.slot, "generation": self.generation, "pid": os.getpid(),
                       "name": self.name}
        for listener in listeners:
            server = Server(listener, application, log=self.access_log or None,
                            error_log=self.log, environ={"ipserve.worker": worker_info},
                            limits=Limits(self.spec), lag=self.lag)
            server.start()
            self.servers.append(server)
        self._set_title()
        self.lag.start()
        self.state = "active"
        gevent.signal_handler(signal.SIGTERM, self.stop, self.spec["graceful_timeout"])
        gevent.signal_handler(signal.SIGQUIT, self.quit)
        gevent.signal_handler(signal.SIGINT, lambda: None)  # the master decides
        self.log.info("worker slot %d gen %d listening on port %d", self.slot, self.generation, self.port)
        self.link_loop()

    def _set_title(self) -> None:
        try:
            import setproctitle
            setproctitle.setproctitle(
                f"ipserve: worker [{self.name}] slot {self.slot} gen {self.generation} :{self.port}")
        except ImportError:
            pass

    def handback_fds(self) -> list[int]:
        """Our listening sockets, which a new master takes back on takeover
        (sent with every hello; only an adopting master keeps them)."""
        if self.state != "active":
            return []   # a retiring worker has closed its listeners
        return [server.socket.fileno() for server in self.servers]

    # -------------------------------------------------------------- stats
    def connections(self) -> int:
        return sum(s.connections for s in self.servers)

    def requests(self) -> int:
        return sum(s.requests for s in self.servers)

    def hello(self) -> dict:
        return {"type": "ready", "pid": os.getpid(), "slot": self.slot,
                "generation": self.generation, "port": self.port, "name": self.name,
                "state": self.state, "started": self.started,
                "connections": self.connections(), "requests": self.requests()}

    def heartbeat(self) -> dict:
        return {"type": "heartbeat", "connections": self.connections(),
                "requests": self.requests(), "lag_ms": round(self.lag.take_peak(), 2),
                "too_busy": self.lag.too_busy(), "shed": sum(s.shed for s in self.servers),
                "websockets": sum(len(s.websockets) for s in self.servers),
                "state": self.state}

    # -------------------------------------------------------------- master link
    def link_loop(self) -> None:
        """Stay connected to whichever master owns the control socket.

        The worker serves whether or not a master is there; when the link
        breaks it reconnects every half second and says who it is again.
        """
        path = self.spec["control"]
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                if self.handback_fds():
                    socket.send_fds(sock, [encode(self.hello())], self.handback_fds())
                else:
                    sock.sendall(encode(self.hello()))
            except OSError:
                sock.close()
                gevent.sleep(0.5)
                continue
            self.link = sock
            beats = gevent.spawn(self._beat, sock)
            try:
                self._read_commands(sock)
            finally:
                beats.kill()
                self.link = None
                sock.close()
            self.log.info("lost the master; reconnecting")
            gevent.sleep(0.5)

    def _beat(self, sock: socket.socket) -> None:
        while True:
            gevent.sleep(1.0)
            try:
                sock.sendall(encode(self.heartbeat()))
            except OSError:
                return

    def _read_commands(self, sock: socket.socket) -> None:
        reader = LineReader()
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for message in reader.feed(data):
                self.command(message)

    def command(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "stop":
            gevent.spawn(self.stop, float(message.get("timeout", self.spec["graceful_timeout"])))
        elif kind == "quit":
            self.quit()
        elif kind == "retire":
            self.retire()
        elif kind == "close":
            gevent.spawn(self.close_all)
        elif kind == "reopen":
            self.log = logs.setup_error_log(self.spec["error_log"], self.spec["log_level"])
            self.access_log = logs.setup_access_log(self.spec["access_log"])
        else:
            self.log.warning("unknown command from master: %r", message)

    # -------------------------------------------------------------- ending
    def retire(self) -> None:
        """New connections of our slot now go to a newer worker: stop accepting
        once the few already on their way have landed, serve what we hold,
        exit when the last connection closes."""
        if self.state != "active":
            return
        self.state = "retiring"
        for server in self.servers:
            server.retiring = True
        self.log.info("retiring: holding %d connection(s)", self.connections())
        gevent.spawn(self._drain)

    def _drain(self) -> None:
        # Connections the kernel routed to us just before the switch may still
        # sit in the accept queue; take them before closing the listener.
        # With reuseport the queue is the slot's shared socket, which the
        # master and our successor hold too: stop accepting at once, or we
        # would keep taking the slot's new connections for the grace period.
        if not self.spec.get("shared_listeners"):
            gevent.sleep(RETIRE_ACCEPT_GRACE)
        for server in self.servers:
            server.close()
        while self.connections():
            gevent.sleep(0.5)
        self.log.info("retired: last connection closed after %d request(s)", self.requests())
        self.quit()

    def close_all(self) -> None:
        """End every connection now (kill-retired, retired_timeout)."""
        self.log.info("closing %d connection(s) (%d WebSocket(s), code 1001)",
                      self.connections(), sum(len(s.websockets) for s in self.servers))
        for server in self.servers:
            for ws in list(server.websockets):
                try:
                    close_websocket(ws, 1001, b"server going away")
                except Exception:  # the peer may be gone already
                    pass
        gevent.sleep(0.2)  # let the close frames go out
        self.quit()

    def stop(self, timeout: float) -> None:
        """Stop accepting, let held connections finish for up to `timeout`, exit."""
        if self.state == "stopping":
            return
        self.state = "stopping"
        self.log.info("stopping: %d connection(s) may finish within %.0fs", self.connections(), timeout)
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + timeout
        while self.connections() and time.monotonic() < deadline:
            gevent.sleep(0.1)
        self.quit()

    def quit(self) -> None:
        for handler in self.log.handlers:
            handler.flush()
        os._exit(0)

    def report_boot_failure(self, error: str) -> None:
        """Tell the master why we never became ready (it shows it in status)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(self.spec["control"])
                sock.sendall(encode({"type": "boot-failed", "pid": os.getpid(), "error": error}))
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--check":
        sys.exit(check_app(argv[1], argv[2] if len(argv) > 2 else None))
    spec = json.loads(argv[0])
    worker = Worker(spec)
    try:
        worker.run()
    except app_loader.AppError as exc:
        worker.log.error("slot %d gen %d cannot start: %s\n%s", worker.slot, worker.generation,
                         exc, exc.detail.rstrip())
        worker.report_boot_failure(str(exc))
        sys.exit(3)
    except Exception as exc:
        worker.log.exception("slot %d gen %d cannot start", worker.slot, worker.generation)
        worker.report_boot_failure(f"{type(exc).__name__}: {exc}")
        sys.exit(3)
