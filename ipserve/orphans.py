"""What a master leaves behind when it is gone: workers, rules, files.

`ipservectl stop` and `cleanup` use this when no master answers: holding the
name's lock (so no master starts meanwhile), they remove the routing rules
the state file names, stop the workers it records gracefully (SIGTERM, by
pidfd, only if pid and start time still match) and remove the runtime files.
"""

from __future__ import annotations

import dataclasses
import os
import signal

from ipserve import config, control, routing, runtime
from ipserve.errors import UsageError
from ipserve.master import state
from ipserve.master.spawner import ProcessHandle
from ipserve.messages import BadMessage


@dataclasses.dataclass
class Cleaned:
    workers_stopped: list[int]
    rules_removed: list[str]          # backends whose rules were removed
    rule_errors: list[str]
    files_removed: list[str]


def paths(runtime_dir: str, name: str) -> dict[str, str]:
    return {kind: os.path.join(runtime_dir, f"{name}.{kind}")
            for kind in ("sock", "pid", "state", "lock")}


def clean(runtime_dir: str, name: str, binds: list[str] | None, all_backends: bool) -> Cleaned:
    """Stop a gone master's workers and remove its rules and files. Raises
    UsageError if a master still holds the name (then it must be stopped)."""
    files = paths(runtime_dir, name)
    lock = runtime.InstanceLock(files["lock"])
    if os.path.exists(files["lock"]) and not lock.try_acquire():
        raise UsageError(f"{name}: master pid {lock.holder()} holds the name but does not answer on "
                         f"its control socket; stop that process first (kill -TERM, or kill -KILL "
                         f"if it is hung: its workers keep serving)")
    try:
        recorded = None
        try:
            data = runtime.read_private_json(files["state"])
            recorded = None if data is None else state.parse(data)
        except BadMessage as exc:
            raise UsageError(f"state file {files['state']} is unreadable: {exc}") from None
        done = Cleaned([], [], [], [])
        bind_list = config.parse_binds(
            binds or (list(recorded.binds) if recorded else ["0.0.0.0:8000", "[::]:8000"]))
        kinds = list(routing.AUTO_ORDER) if all_backends or recorded is None else [recorded.router]
        for kind in kinds:
            if kind not in routing.AUTO_ORDER:
                continue       # reuseport: nothing in the kernel outlives its sockets
            router = routing.backend_class(kind)(name, bind_list)
            try:
                router.check()
                router.remove()
                done.rules_removed.append(kind)
            except (routing.RouterUnavailable, routing.RouteError) as exc:
                done.rule_errors.append(f"{kind}: {exc}")
        for entry in recorded.workers if recorded else ():
            process = ProcessHandle.attach(entry.pid, entry.start_time)
            if process is not None:
                if process.signal(signal.SIGTERM):
                    done.workers_stopped.append(entry.pid)
                process.close()
        for kind in ("sock", "state", "pid"):
            if os.path.lexists(files[kind]):
                runtime.remove_quietly(files[kind])
                done.files_removed.append(files[kind])
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
