#!/usr/bin/env python3
"""Hello-world throughput: ipserve -w 2 versus gunicorn -k gevent -w 2.

    sudo .venv/bin/python bench/throughput.py [--duration 6] [--rounds 5]
        [--connections 50] [--router auto --router reuseport] [--workers 2]

Load comes from 4 client namespaces (source addresses 198.18.k.(16+k), so
two land on each ipserve slot), one `wrk -t1 -cC -dDs` per namespace, all
four at once, each to the server address on its own veth link. Every server
serves the same app, examples/hello.py:application, and all of them run for
the whole benchmark (on different ports); rounds alternate between them
(the order rotates every round) so that drift in the shared machine's load
hits each alike. Reports the median requests/s of the rounds, the ratio
ipserve/gunicorn, wrk's errors, and the servers' CPU seconds per 1000
requests (the client and the server share 2 cores: requests per server
CPU-second is the less noisy measure of the server's cost), and fairness:
the slowest client namespace's requests/s as a share of an even quarter
(100% = every client served alike; 0% = one client namespace starved).

Writes bench/results/throughput-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common
from common import netns

APP = "examples/hello.py:application"      # ipserve: path form
GUNICORN_APP = "examples.hello:application"  # gunicorn: module form, --chdir repo root


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=6, help="seconds per round (default 6)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds per server (default 5; short interleaved rounds follow the "
                        "shared machine's drift better than long ones)")
    p.add_argument("--connections", type=int, default=50,
                   help="wrk connections per client namespace (default 50; 4 namespaces)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads per client namespace")
    p.add_argument("--workers", type=int, default=2, help="workers of each server (default 2)")
    p.add_argument("--router", action="append", default=None,
                   choices=("auto", "nft", "iptables", "iptc", "reuseport"),
                   help="ipserve router(s) to measure; repeat for several "
                        "(default: auto and reuseport)")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per server")
    p.add_argument("--no-gunicorn", action="store_true", help="measure ipserve only")
    p.add_argument("--ipserve-arg", action="append", default=[],
                   help="extra argument for ipserve (repeatable), e.g. --ipserve-arg=--access-log=/dev/null")
    return p.parse_args(argv)


class Target:
    def __init__(self, label, port, start, worker_pids, stop):
        self.label, self.port = label, port
        self.start, self.worker_pids, self.stop = start, worker_pids, stop
        self.rounds: list[dict] = []


def main(argv=None) -> int:
    args = parse_args(argv)
    routers = args.router or ["auto", "reuseport"]
    wrk, gunicorn = common.preflight(need_gunicorn=not args.no_gunicorn)
    started = time.time()
    tb = common.make_testbed(4)
    targets: list[Target] = []
    try:
        port = 8100
        for router in routers:
            port += 1
            proc = netns.start_ipserve(
                tb, [APP, "-w", str(args.workers), "-b", f"0.0.0.0:{port}", "--router", router,
                     "--log-level", "warning", *args.ipserve_arg])
            targets.append(Target(f"ipserve --router {router}", port, proc,
                                  (lambda p=proc: common.ipserve_worker_pids(p)),
                                  (lambda p=proc: (p.stop(timeout=15), p.cleanup()))))
        if not args.no_gunicorn:
            port += 1
            g = common.Gunicorn(tb, gunicorn, GUNICORN_APP, port, workers=args.workers,
                                worker_class="gevent", extra=["--log-level", "warning"])
            targets.append(Target("gunicorn -k gevent", port, g, g.worker_pids, g.stop))

        for t in targets:
            if isinstance(t.start, netns.IpserveProcess):
                st = t.start.wait_ready(args.workers, timeout=60)
                t.router_name = st["router"]
            common.wait_http(tb, t.port)
        print(f"bench: testbed {tb.server_ns}, 4 client namespaces, "
              f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s in each", flush=True)
        pinning = check_pinning(tb, targets)
        for t in targets:
            print(f"bench: {t.label}: port {t.port}; {pinning[t.label]}", flush=True)

        for t in targets:                       # warm-up (not measured)
            if args.warmup > 0:
                common.run_load(tb, wrk, t.port, args.warmup, args.connections,
                                threads=args.threads)

        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                pids = t.worker_pids()
                cpu0 = common.cpu_seconds(pids)
                sys0 = common.system_cpu()
                load = common.run_load(tb, wrk, t.port, args.duration, args.connections,
                                       threads=args.threads)
                cpu = common.cpu_seconds(pids) - cpu0
                machine = common.system_busy(sys0, common.system_cpu())
                rec = {"round": r + 1, "rps": round(load.rps, 1), "requests": load.requests,
                       "errors": load.error_dict(), "server_cpu_s": round(cpu, 2),
                       "machine_busy": machine["busy"], "machine_steal": machine["steal"],
                       "cpu_ms_per_1k_req": round(1e6 * cpu / load.requests, 1) if load.requests else None,
                       "p50_ms": load.p50_ms, "p99_ms": load.p99_ms,
                       "per_client_rps": [round(x.rps, 1) for x in load.per_client],
                       # the slowest client namespace's share of a fair quarter
                       "fairness": round(min(x.rps for x in load.per_client)
                                         / (load.rps / len(load.per_client)), 3) if load.rps else 0.0}
                t.rounds.append(rec)
                print(f"bench: round {r + 1} {t.label:<26} {load.rps:9.0f} req/s  "
                      f"errors {load.errors}  server CPU {cpu:.1f}s  "
                      f"machine busy {100 * machine['busy']:.0f}% steal {100 * machine['steal']:.0f}%  "
                      f"per client {rec['per_client_rps']}", flush=True)
                if load.requests == 0:
                    print(load.per_client[0].raw, file=sys.stderr)
    finally:
        for t in targets:
            try:
                t.stop()
            except Exception as exc:            # noqa: BLE001
                print(f"bench: stopping {t.label}: {exc}", file=sys.stderr)
        tb.close()

    summary = summarize(targets)
    print()
    print(render(summary, args))
    path = common.write_json("throughput", {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": common.machine(), "args": vars(args), "app": APP,
        "pinning": pinning, "servers": summary})
    print(f"\nbench: results in {path}")
    return 0


def check_pinning(tb, targets) -> dict:
    """Which worker answers each client namespace's default source address."""
    out = {}
    for t in targets:
        seen = []
        for c in tb.clients:
            _, _, body = netns.http_get(c.ns, None, c.server_ip, t.port, "/")
            text = body.decode(errors="replace").strip()
            # "Hello from worker pid P (slot S, generation G); you are A"
            pid = text.split("pid ", 1)[1].split()[0] if "pid " in text else "?"
            addr = text.rsplit(" ", 1)[-1]
            seen.append(f"{addr}->pid {pid}")
        out[t.label] = ", ".join(seen)
    return out


def summarize(targets) -> list[dict]:
    gun = next((t for t in targets if t.label.startswith("gunicorn")), None)
    gun_med = statistics.median(r["rps"] for r in gun.rounds) if gun and gun.rounds else None
    gun_cpu = (statistics.median(r["cpu_ms_per_1k_req"] for r in gun.rounds)
               if gun and gun.rounds else None)
    rows = []
    for t in targets:
        if not t.rounds:
            continue
        med = statistics.median(r["rps"] for r in t.rounds)
        cpu = statistics.median(r["cpu_ms_per_1k_req"] for r in t.rounds)
        errors = {k: sum(r["errors"][k] for r in t.rounds) for k in t.rounds[0]["errors"]}
        rows.append({
            "server": t.label, "router": getattr(t, "router_name", None), "port": t.port,
            "median_rps": round(med, 1),
            "min_rps": min(r["rps"] for r in t.rounds), "max_rps": max(r["rps"] for r in t.rounds),
            "ratio_vs_gunicorn": round(med / gun_med, 3) if gun_med else None,
            "cpu_ms_per_1k_req": cpu,
            "cpu_ratio_vs_gunicorn": round(cpu / gun_cpu, 3) if gun_cpu else None,
            "p50_ms": statistics.median(r["p50_ms"] for r in t.rounds if r["p50_ms"] is not None),
            "fairness": statistics.median(r["fairness"] for r in t.rounds),
            "errors": errors, "rounds": t.rounds})
    return rows


def render(summary, args) -> str:
    rows = [["server", "median req/s", "min..max", "vs gunicorn", "CPU ms/1k req",
             "CPU vs gunicorn", "p50 ms", "slowest client", "errors c/r/w/t/non2xx"]]
    for s in summary:
        e = s["errors"]
        rows.append([s["server"] + (f" ({s['router']})" if s["router"] and s["router"] not in s["server"] else ""),
                     f"{s['median_rps']:.0f}", f"{s['min_rps']:.0f}..{s['max_rps']:.0f}",
                     f"{s['ratio_vs_gunicorn']:.2f}" if s["ratio_vs_gunicorn"] else "-",
                     f"{s['cpu_ms_per_1k_req']:.0f}",
                     f"{s['cpu_ratio_vs_gunicorn']:.2f}" if s["cpu_ratio_vs_gunicorn"] else "-",
                     f"{s['p50_ms']:.1f}", f"{100 * s['fairness']:.0f}%",
                     f"{e['connect']}/{e['read']}/{e['write']}/{e['timeout']}/{e['non2xx']}"])
    head = (f"hello world, {args.workers} workers each, 4 client namespaces x wrk -t{args.threads} "
            f"-c{args.connections}, {args.rounds} rounds x {args.duration:g}s, median")
    return head + "\n" + common.table(rows)


if __name__ == "__main__":
    sys.exit(main())
