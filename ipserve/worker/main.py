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
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

import ipserve  # noqa: E402

from ipserve import app as app_loader  # noqa: E402
from ipserve.app import CHECK_REPORT  # noqa: E402
from ipserve.config import parse_bind  # noqa: E402
from ipserve import logs  # noqa: E402
from ipserve.control import FramingError, LineReader, encode, peer_of  # noqa: E402
from ipserve.messages import BadMessage, Phase, ToWorker, parse_order  # noqa: E402
from ipserve.worker.lag import HubLagMeter  # noqa: E402
from ipserve.worker import leakcheck  # noqa: E402
from ipserve.leaks import Setting as LeakSetting  # noqa: E402
from ipserve.http.limits import Limits  # noqa: E402
from ipserve.http.server import Server  # noqa: E402
from ipserve.http import tls  # noqa: E402


RETIRE_ACCEPT_GRACE = 1.0


class UntrustedPeer(ConnectionRefusedError):
    """The control socket's peer is not the master's uid (nor root)."""



def check_app(spec: str, chdir: str | None) -> int:
    """Import APP as a worker would (same user, no capabilities, same
    directory), then report the RSS it took: the master sizes the machine by it."""
    try:
        if chdir:
            os.chdir(chdir)
        app_loader.load(spec, chdir)
    except app_loader.AppError as exc:
        print(f"ipserve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ipserve: error: chdir {chdir!r}: {exc.strerror}", file=sys.stderr)
        return 2
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(CHECK_REPORT + json.dumps({"rss": rss}), flush=True)
    return 0


def public_addresses(binds) -> dict[int, tuple[str, int]]:
    """Family -> the first public (host, port) of that family, for SERVER_NAME/PORT."""
    public: dict[int, tuple[str, int]] = {}
    for text in binds:
        bind = parse_bind(text)
        public.setdefault(bind.family, (bind.host, bind.port))
    return public


class Worker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.name = spec["name"]
        self.slot = spec["slot"]
        self.generation = spec["generation"]
        self.log = logs.setup_error_log(spec["error_log"], spec["log_level"],
                                        log_format=spec["log_format"])
        self.access_log = logs.setup_access_log(
            spec["access_log"], fmt=spec["access_log_format"],
            log_format=spec["log_format"])
        self.server: Server | None = None
        self.port = 0
        self.phase = Phase.READY      # until the app is loaded, we do not even connect
        self.lag = HubLagMeter(busy_lag_ms=(spec["busy_lag"] or 0.0) * 1000.0)
        ipserve._lag_meter = self.lag
        self.link = None          # socket to the master, when connected
        self.started = time.time()
        self.leak_check: leakcheck.LeakCheck | None = None   # leak_report = off

    # -------------------------------------------------------------- start-up
    def diagnostics(self) -> None:
        """Stacks on SIGABRT (the master sends it to a hung worker before
        SIGKILL), and gevent's report of whatever blocks the hub longer than
        block_report (its "Blocked Stack" names the code), both in the error log."""
        self.point_diagnostics_at_log()
        if self.spec["block_report"]:
            gevent.config.monitor_thread = True
            gevent.config.max_blocking_time = self.spec["block_report"]
            gevent.get_hub().start_periodic_monitoring_thread()

    def point_diagnostics_at_log(self) -> None:
        """Again after every reopen: faulthandler writes to a file descriptor,
        and the old one, closed, could be reused by a client's socket."""
        stream = self.log.handlers[0].stream
        faulthandler.enable(file=stream, all_threads=True)  # SIGABRT, SIGSEGV, ...: dump, then die
        gevent.get_hub().exception_stream = stream

    def run(self) -> None:
        # First: with leak_report = tracemalloc, tracing must see the
        # application's import and every allocation after it.
        self.leak_check = leakcheck.start(LeakSetting(self.spec.get("leak_report", "off")),
                                          self.log)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # one process holds thousands of long-lived connections
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.diagnostics()
        # Before the application is imported: the descriptors of the key and
        # certificate the master passed are closed before any of its code runs.
        tls_context = tls.worker_context(self.spec)
        if self.spec.get("chdir"):
            os.chdir(self.spec["chdir"])
        worker_info = {"slot": self.slot, "generation": self.generation, "pid": os.getpid(),
                       "name": self.name}
        ipserve.current_worker = worker_info
        application = app_loader.load(self.spec["app"], self.spec.get("chdir"))
        # The master opened our listening sockets and keeps a copy: if we die,
        # connections wait in the backlog for our replacement instead of
        # being refused. We accept on them only once the master says we hold
        # our slot (ACTIVATE): a generation that fails to boot whole never
        # takes a connection.
        listeners = [socket.socket(fileno=fd) for fd in self.spec["listen_fds"]]
        self.port = listeners[0].getsockname()[1]
        self.server = Server(listeners, application, limits=Limits.from_settings(self.spec),
                             lag=self.lag, log=self.log, access_log=self.access_log,
                             environ={"ipserve.worker": worker_info},
                             public=public_addresses(self.spec.get("bind", ())),
                             tls=tls_context)
        if self.leak_check is not None:
            # The leak report's baseline: the app is imported and the server
            # built, and nothing has been accepted. The census blocks the hub
            # (gc.collect() and a walk over every object), so it runs now,
            # before we tell the master we are ready: nothing is routed to us
            # until then (a reload's old generation keeps serving meanwhile),
            # so it costs no client anything. At ACTIVATE it would: the slot
            # is already switched to us and new connections would wait.
            self.leak_check.baseline()
        self._set_title("ready")
        self.lag.start()
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self.stop, self.spec["graceful_timeout"]))
        gevent.signal_handler(signal.SIGQUIT, self.quit)
        gevent.signal_handler(signal.SIGINT, lambda: None)  # the master decides
        self.log.info("worker slot %d gen %d ready on port %d", self.slot, self.generation, self.port)
        self.link_loop()

    def _set_title(self, what: str) -> None:
        try:
            import setproctitle
            setproctitle.setproctitle(
                f"ipserve: worker [{self.name}] slot {self.slot} gen {self.generation} :{self.port} {what}")
        except ImportError:
            pass

    def handback_fds(self) -> list[int]:
        """Our listening sockets, which a master taking over keeps if their
        inodes are the ones the previous master recorded."""
        if self.phase not in (Phase.READY, Phase.ACTIVE):
            return []   # a retiring worker has closed its listeners
        return [listener.fileno() for listener in self.server.listeners]

    # -------------------------------------------------------------- stats
    def connections(self) -> int:
        return self.server.connections if self.server is not None else 0

    def requests(self) -> int:
        return self.server.requests if self.server is not None else 0

    def hello(self) -> dict:
        return {"type": "hello", "pid": os.getpid(), "slot": self.slot,
                "generation": self.generation, "name": self.name, "phase": self.phase.value,
                "connections": self.connections(), "requests": self.requests()}

    def heartbeat(self) -> dict:
        server = self.server
        return {"type": "heartbeat", "connections": self.connections(),
                "requests": self.requests(), "lag_ms": round(self.lag.take_peak(), 2),
                "too_busy": self.lag.too_busy(), "shed": server.shed,
                "websockets": len(server.websockets),
                "phase": self.phase.value, "responses": server.responses,
                "durations": server.durations.counts,
                "duration_sum": round(server.durations.total, 6)}

    # -------------------------------------------------------------- master link
    def link_loop(self) -> None:
        """Stay connected to whichever master owns the control socket.

        The worker serves whether or not a master is there; when the link
        breaks it reconnects every half second and says who it is again. It
        obeys only a peer running as the master's uid (or root): whoever
        could bind that path otherwise must not be able to retire us.
        """
        path = self.spec["control"]
        warned = False
        while True:
            try:
                sock = self.connect_to_master()
            except OSError as exc:
                if isinstance(exc, (PermissionError, UntrustedPeer)) and not warned:
                    self.log.warning("cannot use the control socket %s: %s", path, exc)
                    warned = True
                gevent.sleep(0.5)
                continue
            try:
                fds = self.handback_fds()
                if fds:
                    socket.send_fds(sock, [encode(self.hello())], fds)
                else:
                    sock.sendall(encode(self.hello()))
            except OSError:
                sock.close()
                gevent.sleep(0.5)
                continue
            warned = False
            self.link = sock
            beats = gevent.spawn(self._beat, sock)
            try:
                self._read_orders(sock)
            finally:
                beats.kill()
                self.link = None
                sock.close()
            self.log.info("lost the master; reconnecting")
            gevent.sleep(0.5)

    def connect_to_master(self, timeout: float | None = None) -> socket.socket:
        """A connection to the control socket whose peer runs as the master's
        uid (or root): whoever else could bind that path must not be obeyed."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.spec["control"])
            peer = peer_of(sock)
            if peer.uid not in (self.spec["master_uid"], 0):
                raise UntrustedPeer(f"held by uid {peer.uid} (pid {peer.pid}), not the master's "
                                    f"uid {self.spec['master_uid']}: not obeying it")
        except BaseException:
            sock.close()
            raise
        return sock

    def _beat(self, sock: socket.socket) -> None:
        while True:
            gevent.sleep(1.0)
            try:
                sock.sendall(encode(self.heartbeat()))
            except OSError:
                return

    def _read_orders(self, sock: socket.socket) -> None:
        reader = LineReader()
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                received = reader.feed(data)
            except FramingError as exc:
                self.log.warning("unreadable data from the master (%s); reconnecting", exc)
                return
            for message in received:
                try:
                    self.obey(parse_order(message))
                except BadMessage as exc:
                    self.log.warning("ignoring a bad order from the master: %s", exc)

    def obey(self, order) -> None:
        kind = order.kind
        if kind is ToWorker.ACTIVATE:
            self.activate()
        elif kind is ToWorker.RETIRE:
            self.retire()
        elif kind is ToWorker.CLOSE:
            gevent.spawn(self.close_all)
        elif kind is ToWorker.REOPEN:
            # The same logger objects, new handlers: the server's references stay good.
            self.log = logs.setup_error_log(self.spec["error_log"], self.spec["log_level"],
                                            log_format=self.spec["log_format"])
            self.access_log = logs.setup_access_log(
                self.spec["access_log"], fmt=self.spec["access_log_format"],
                log_format=self.spec["log_format"])
            self.point_diagnostics_at_log()
        elif kind is ToWorker.REFUSED:
            # The master does not know us (it lost its predecessor's record of
            # us): nothing will ever be routed to us again.
            self.log.warning("the master does not know this worker; %s",
                             "exiting" if self.phase is Phase.READY else "draining and exiting")
            if self.phase is Phase.READY:
                self.quit()
            self.retire()

    # -------------------------------------------------------------- serving
    def activate(self) -> None:
        """We hold our slot: start accepting."""
        if self.phase is not Phase.READY:
            return
        self.server.start()
        self.phase = Phase.ACTIVE
        self._set_title("active")
        self.log.info("worker slot %d gen %d accepting on port %d", self.slot, self.generation, self.port)

    # -------------------------------------------------------------- ending
    def retire(self) -> None:
        """New connections of our slot now go to a newer worker: stop accepting
        once the few already on their way have landed, serve what we hold,
        exit when the last connection closes."""
        if self.phase not in (Phase.READY, Phase.ACTIVE):
            return
        was_active = self.phase is Phase.ACTIVE
        self.phase = Phase.RETIRING
        self._set_title("retiring")
        self.server.retire()
        self.log.info("retiring: holding %d connection(s)", self.connections())
        gevent.spawn(self._drain, was_active)

    def _drain(self, was_active: bool) -> None:
        # Connections the kernel routed to us just before the switch may still
        # sit in the accept queue; take them before closing the listener.
        # With reuseport the queue is the slot's shared socket, which the
        # master and our successor hold too: stop accepting at once, or we
        # would keep taking the slot's new connections for the grace period.
        if was_active and not self.spec.get("shared_listeners"):
            gevent.sleep(RETIRE_ACCEPT_GRACE)
        self.server.close()
        while self.connections():
            gevent.sleep(0.5)
        self.log.info("retired: last connection closed after %d request(s)", self.requests())
        try:
            self.send_leak_report()
        finally:
            self.quit()

    def send_leak_report(self) -> None:
        """What grew since ready, told to the master: only here, at the end of
        a retirement whose last connection closed (the census blocks the hub,
        and no client is left to wait on it). A stop, a kill or close_all
        sends none: their connections were cut, so what they held is no leak."""
        if self.leak_check is None:
            return
        message = self.leak_check.report(time.time() - self.started, self.requests())
        sock = self.link
        if sock is None:
            self.log.info("leak report not sent: no master connected")
            return
        try:
            sock.settimeout(2.0)
            sock.sendall(encode(message))
        except Exception as exc:   # noqa: BLE001 - exiting matters more than the report
            self.log.info("leak report not sent: %s", exc)

    def close_websockets(self) -> int:
        websockets = list(self.server.websockets)
        for ws in websockets:
            ws.close(1001, b"server going away")
        return len(websockets)

    def close_all(self) -> None:
        """End every connection now (kill-retired, retired_timeout)."""
        self.log.info("closing %d connection(s) (%d WebSocket(s), code 1001)",
                      self.connections(), len(self.server.websockets))
        self.close_websockets()
        gevent.sleep(0.2)  # let the close frames go out
        self.quit()

    def stop(self, timeout: float) -> None:
        """Stop accepting, let held connections finish for up to `timeout`; then
        WebSockets still open get a 1001 close frame rather than a cut connection."""
        if self.phase is Phase.STOPPING:
            return
        self.phase = Phase.STOPPING
        self.log.info("stopping: %d connection(s) may finish within %gs", self.connections(), timeout)
        self.server.retire()      # keep-alive clients get Connection: close
        self.server.close()
        deadline = time.monotonic() + timeout
        while self.connections() and time.monotonic() < deadline:
            gevent.sleep(0.1)
        if self.close_websockets():
            gevent.sleep(0.2)  # let the close frames go out
        self.quit()

    def quit(self) -> None:
        self.last_word()
        for handler in self.log.handlers:
            handler.flush()
        os._exit(0)

    def last_word(self) -> None:
        """A last heartbeat, so the master's counters hold every request we
        served since the previous one."""
        sock = self.link
        if sock is None or self.server is None:
            return
        try:
            sock.settimeout(1.0)
            sock.sendall(encode(self.heartbeat()))
        except Exception:   # noqa: BLE001 - from a signal handler in the hub, a send that
            pass            # would block raises; exiting matters more than the count

    def report_boot_failure(self, error: str) -> None:
        """Tell the master why we never became ready (it shows it in status)."""
        try:
            with self.connect_to_master(timeout=2.0) as sock:
                sock.sendall(encode({"type": "boot-failed", "error": error[:2000]}))
                # The master closes once it has read it: exiting before that
                # could let it see the exit first, without the why.
                sock.recv(1)
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
    except tls.TlsError as exc:     # one line, like a bad APP: the files are the cause
        worker.log.error("slot %d gen %d cannot start: %s", worker.slot, worker.generation, exc)
        worker.report_boot_failure(str(exc))
        sys.exit(3)
    except Exception as exc:
        worker.log.exception("slot %d gen %d cannot start", worker.slot, worker.generation)
        worker.report_boot_failure(f"{type(exc).__name__}: {exc}")
        sys.exit(3)
