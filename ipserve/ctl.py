"""`ipservectl`: talk to a running master over its control socket, or clean
up after one that is gone.

Never a traceback: every failure is one line on standard error; exit status
2 for a usage error (a bad name, an unsafe runtime directory, cleaning up a
running master), 1 when the master refuses or cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ipserve
from ipserve import config, control, names, orphans, runtime, status, top
from ipserve.errors import USAGE_ERROR, ArgumentParser, UsageError

TIMEOUT = 10.0


class Failed(Exception):
    """The command did not succeed; one line for the user, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ipservectl", description="Control a running ipserve.")
    parser.add_argument("--version", action="version", version=f"ipserve {ipserve.version()}")
    parser.add_argument("-n", "--name", default="ipserve-8000",
                        help="Instance name (ipserve's -n/--name). Default: ipserve-8000.")
    parser.add_argument("--runtime-dir", default=None,
                        help="Where the control socket lives (ipserve's --runtime-dir).")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"Seconds to wait for the master's answer (default {TIMEOUT:g}).")
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="Show the master and every worker.")
    st.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    sub.add_parser("top", help="A live view of the master and every worker, slot by slot, "
                               "refreshed every second (q quits).")
    lk = sub.add_parser("leaks", help="Show what grew in retired workers (their leak reports).")
    lk.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    sub.add_parser("stop", help="Graceful stop (like kill -TERM on the master); with no master, "
                                "stop the workers it left and remove its rules.")
    sub.add_parser("reload", help="Start a new generation of workers (like kill -HUP).")
    sub.add_parser("kill-retired", help="Close the connections of retiring workers (like kill -USR1).")
    cl = sub.add_parser("cleanup", help="With no master running: stop the workers it left, remove "
                                        "its firewall rules (every backend) and stale files.")
    cl.add_argument("-b", "--bind", action="append", default=None,
                    help="Bind address(es) the instance used, if its state file is gone "
                         "(default 0.0.0.0:8000 and [::]:8000).")
    return parser


def ask(path: str, name: str, command: str, timeout: float) -> dict:
    try:
        reply, _ = control.request(path, {"cmd": command}, timeout=timeout)
    except TimeoutError:
        raise Failed(f"{name}: the master did not answer within {timeout:g}s (hung, or too busy)") from None
    if reply.get("ok") is False:
        raise Failed(f"{name}: {reply.get('error') or 'refused'}")
    return reply


ROOT_RUNTIME_DIR = "/run/ipserve"
USER_RUNTIME_DIR = "$XDG_RUNTIME_DIR/ipserve or /tmp/ipserve-<uid>"


def where_we_looked(runtime_dir: str, name: str, given: bool, uid: int) -> str:
    """What to add to "no master is listening": where ipservectl looked, and
    where a master started by another user, or with --runtime-dir, listens."""
    if given:
        return f"is a master running with -n {name} --runtime-dir {runtime_dir}?"
    if uid == 0:
        whose, elsewhere = "root's", f"by a user listens in its {USER_RUNTIME_DIR}"
    else:
        whose = f"uid {uid}'s"
        elsewhere = (f"by root listens in {ROOT_RUNTIME_DIR}, by another user in its "
                     f"{USER_RUNTIME_DIR}")
    return (f"{runtime_dir} is {whose} default runtime directory; a master started {elsewhere}, "
            f"with --runtime-dir DIR in DIR: give ipservectl the same --runtime-dir (and -n)")


def clean_up(runtime_dir: str, name: str, binds: list[str] | None, all_backends: bool) -> str:
    # Nothing is removed from a directory somebody else controls.
    runtime.secure_dir(runtime_dir, create=False)
    done = orphans.clean(runtime_dir, name, binds, all_backends,
                         progress=lambda line: print(f"ipservectl: {line}", file=sys.stderr))
    stopped = len(done.workers_stopped) - len(done.workers_killed)
    parts = [f"stopped {stopped} orphaned worker(s) after they finished what they held"
             if done.workers_stopped else "no orphaned worker",
             f"killed {len(done.workers_killed)} still running after their graceful_timeout"
             if done.workers_killed else "",
             f"removed the rules ({', '.join(done.rules_removed)})" if done.rules_removed
             else "no rules removed"]
    parts = [part for part in parts if part]
    for error in done.rule_errors:
        print(f"ipservectl: {error}", file=sys.stderr)
    return f"{name}: " + "; ".join(parts)


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        name = names.validate(args.name)
    except ValueError as exc:
        raise UsageError(f"-n {args.name!r}: {exc}") from None
    runtime_dir = args.runtime_dir or config.default_runtime_dir()
    path = control.socket_path(runtime_dir, name)
    if args.command == "cleanup":
        pid = orphans.master_answers(runtime_dir, name)
        if pid is not None:
            raise UsageError(f"{name} is running (master pid {pid}); stop it instead")
        print(clean_up(runtime_dir, name, args.bind, all_backends=True))
        return 0
    # top and leaks read the status document like status does.
    command = "status" if args.command in ("top", "leaks") else args.command
    try:
        reply = ask(path, name, command, args.timeout)
    except control.NoMaster as exc:
        if args.command != "stop":
            hint = where_we_looked(runtime_dir, name, args.runtime_dir is not None, os.geteuid())
            raise Failed(f"{name}: {exc}; {hint}") from None
        print(clean_up(runtime_dir, name, None, all_backends=False) + " (no master was running)")
        return 0
    except control.ControlUnavailable as exc:   # permission denied, a timeout on connect
        raise Failed(f"{name}: {exc}") from None
    if args.command == "status":
        print(json.dumps(reply, indent=2) if args.json else status.render_table(reply))
    elif args.command == "top":
        return top.run(lambda: ask(path, name, "status", args.timeout), first=reply)
    elif args.command == "leaks":
        reports = reply.get("leak_reports") or []    # an older master has none
        print(json.dumps(reports, indent=2) if args.json else status.render_leaks(reports))
    else:
        print(reply.get("message") or json.dumps(reply))
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except UsageError as exc:
        print(f"ipservectl: error: {exc}", file=sys.stderr)
        code = USAGE_ERROR
    except (Failed, control.ControlUnavailable) as exc:
        print(f"ipservectl: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:   # noqa: BLE001 - one line, never a traceback
        print(f"ipservectl: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
