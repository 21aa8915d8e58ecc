"""What a master leaves behind when it is gone: workers, rules, files.

`ipservectl stop` and `cleanup` use this when no master answers. Holding the
name's lock (so no master starts meanwhile) they do what a master's graceful
stop does: drain the routing rules (nothing new is routed, established
connections stay translated), SIGTERM the workers the state file records
(by pidfd, only if pid and start time still match) and wait for them to
finish what they hold, then remove the rules and the runtime files.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import time

from ipserve import config, control, routing, runtime
from ipserve.errors import UsageError
from ipserve.master import state
from ipserve.master.spawner import ProcessHandle
from ipserve.messages import BadMessage

KILL_AFTER = 5.0     # seconds past the workers' graceful_timeout


@dataclasses.dataclass
class Cleaned:
    workers_stopped: list[int]
    workers_killed: list[int]          # still there after their graceful_timeout
    rules_removed: list[str]           # backends whose rules were removed
    rule_errors: list[str]


def paths(runtime_dir: str, name: str) -> dict[str, str]:
    return {kind: os.path.join(runtime_dir, f"{name}.{kind}")
            for kind in ("sock", "pid", "state", "lock")}


def read_state(path: str) -> state.Recorded | None:
    try:
        data = runtime.read_private_json(path)
        return None if data is None else state.parse(data)
    except BadMessage as exc:
        raise UsageError(f"state file {path} is unreadable: {exc}") from None


def routers(name: str, recorded: state.Recorded | None, binds: list[str] | None,
            all_backends: bool) -> list[routing.Router]:
    """The NAT backends to clean: the recorded one, or every one."""
    bind_list = config.parse_binds(
        binds or (list(recorded.binds) if recorded else ["0.0.0.0:8000", "[::]:8000"]))
    kinds = routing.AUTO_ORDER if all_backends or recorded is None else [recorded.router]
    out = []
    for kind in kinds:
        if kind not in routing.AUTO_ORDER:
            continue      # reuseport leaves nothing in the kernel that outlives its sockets
        if kind == "iptc":
            # python-iptables handles one address family per process (loading
            # the other's extensions makes libxtables exit): the first one.
            first = min(b.family for b in bind_list)
            out.append(routing.backend_class(kind)(name, [b for b in bind_list
                                                           if b.family == first]))
            continue
        out.append(routing.backend_class(kind)(name, bind_list))
    return out


def stop_workers(recorded: state.Recorded | None, progress) -> tuple[list[int], list[int]]:
    """SIGTERM every recorded worker still running, wait for them to finish
    (their graceful_timeout), SIGKILL what is left. Returns (stopped, killed)."""
    processes = [p for entry in (recorded.workers if recorded else ())
                 if (p := ProcessHandle.attach(entry.pid, entry.start_time)) is not None]
    if not processes:
        return [], []
    try:
        for process in processes:
            process.signal(signal.SIGTERM)
        wait = recorded.graceful_timeout + KILL_AFTER
        progress(f"waiting up to {wait:g}s for {len(processes)} orphaned worker(s) to finish "
                 f"what they hold")
        alive = wait_exits(processes, time.monotonic() + wait)
        for process in alive:
            process.signal(signal.SIGKILL)
        wait_exits(alive, time.monotonic() + 5.0)
        return [p.pid for p in processes], [p.pid for p in alive]
    finally:
        for process in processes:
            process.close()


def wait_exits(processes: list[ProcessHandle], deadline: float) -> list[ProcessHandle]:
    """Those still running at `deadline` (pidfds turn readable at exit)."""
    pending = list(processes)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, _, _ = select.select(pending, [], [], left)
        pending = [p for p in pending if p not in done]
    return pending


def clean(runtime_dir: str, name: str, binds: list[str] | None, all_backends: bool,
          progress=lambda line: None) -> Cleaned:
    """Stop a gone master's workers and remove its rules and files. Raises
    UsageError if a master still holds the name (then it must be stopped)."""
    files = paths(runtime_dir, name)
    lock = runtime.InstanceLock(files["lock"])
    if os.path.exists(files["lock"]) and not lock.try_acquire():
        raise UsageError(f"{name}: master pid {lock.holder()} holds the name but does not answer "
                         f"on its control socket; stop that process first (kill -TERM, or kill "
                         f"-KILL if it is hung: its workers keep serving)")
    try:
        recorded = read_state(files["state"])
        done = Cleaned([], [], [], [])
        usable = []
        for router in routers(name, recorded, binds, all_backends):
            try:
                router.check()
                usable.append(router)
            except routing.RouterUnavailable:
                pass               # not installed or not usable here: it wrote nothing either
        if recorded is not None and recorded.workers:
            for router in usable:
                try:
                    router.drain()     # nothing new; what the workers hold stays connected
                except routing.RouteError as exc:
                    done.rule_errors.append(f"{router.name}: {exc}")
        done.workers_stopped, done.workers_killed = stop_workers(recorded, progress)
        for router in usable:
            try:
                router.remove()
                done.rules_removed.append(router.name)
            except routing.RouteError as exc:
                done.rule_errors.append(f"{router.name}: {exc}")
        for kind in ("sock", "state", "pid"):
            if os.path.lexists(files[kind]):
                runtime.remove_quietly(files[kind])
        return done
    finally:
        lock.release()


def master_answers(runtime_dir: str, name: str) -> int | None:
    """The pid of the master answering on the control socket, or None."""
    try:
        reply, _ = control.request(control.socket_path(runtime_dir, name), {"cmd": "status"},
                                   timeout=3.0)
    except (control.ControlUnavailable, TimeoutError):
        return None
    master = reply.get("master")
    return master.get("pid") if isinstance(master, dict) else -1
