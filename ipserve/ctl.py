"""`ipservectl`: talk to a running master over its control socket."""

from __future__ import annotations

import argparse
import json
import sys

from ipserve import config, control, status

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipservectl", description="Control a running ipserve.")
    parser.add_argument("-n", "--name", default="ipserve-8000",
                        help="Instance name (ipserve's -n/--name). Default: ipserve-8000.")
    parser.add_argument("--runtime-dir", default=None,
                        help="Where the control socket lives (ipserve's --runtime-dir).")
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="Show the master and every worker.")
    st.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    sub.add_parser("stop", help="Graceful stop (like kill -TERM on the master).")
    sub.add_parser("reload", help="Start a new generation of workers (like kill -HUP).")
    sub.add_parser("kill-retired", help="Close the connections of retiring workers (like kill -USR1).")
    cl = sub.add_parser("cleanup", help="Remove this instance's firewall rules and stale files "
                                        "(when no master is running).")
    cl.add_argument("-b", "--bind", action="append", default=None,
                    help="Bind address(es) the instance used, for its IPv6 rules (default 0.0.0.0:8000).")
    return parser


def cleanup(name: str, runtime_dir: str, binds: list[str] | None) -> int:
    import os

    from ipserve import routing

    path = control.socket_path(runtime_dir, name)
    try:
        reply = control.request(path, {"cmd": "status"}, timeout=3.0)
        print(f"ipservectl: error: {name} is running (master pid {reply['master']['pid']}); "
              f"stop it instead", file=sys.stderr)
        return USAGE_ERROR
    except control.ControlUnavailable:
        pass
    bind_list = config.parse_binds(binds or ["0.0.0.0:8000", "[::]:8000"])
    removed = []
    for kind in routing.AUTO_ORDER:
        router = routing.backend_class(kind)(name, bind_list)
        try:
            router.check()
            router.remove()
            removed.append(kind)
        except (routing.RouterUnavailable, routing.RouteError) as exc:
            print(f"ipservectl: {kind}: {exc}", file=sys.stderr)
    for stale in (path, os.path.join(runtime_dir, name + ".pid")):
        if os.path.exists(stale):
            os.unlink(stale)
    print(f"ipservectl: removed the rules of {name} ({', '.join(removed) or 'no backend available'})")
    return 0 if removed else 1


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runtime_dir = args.runtime_dir or config.default_runtime_dir()
    if args.command == "cleanup":
        sys.exit(cleanup(args.name, runtime_dir, args.bind))
    path = control.socket_path(runtime_dir, args.name)
    try:
        reply = control.request(path, {"cmd": args.command})
    except control.ControlUnavailable as exc:
        print(f"ipservectl: error: {args.name}: {exc}", file=sys.stderr)
        sys.exit(1)
    if args.command == "status":
        print(json.dumps(reply, indent=2) if args.json else status.render_table(reply))
    else:
        print(reply.get("message") or reply.get("error") or json.dumps(reply))
        sys.exit(0 if reply.get("ok") else 1)


if __name__ == "__main__":
    main()
