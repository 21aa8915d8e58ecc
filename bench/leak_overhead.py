#!/usr/bin/env python3
"""What leak reports cost: ipserve with leak_report = off, types and
tracemalloc side by side, in one run.

    sudo .venv/bin/python bench/leak_overhead.py [--rounds 3] [--duration 5]
        [--connections 50] [--workers 2] [--app examples/hello.py:application]

Three ipserve servers (one per setting, different ports, `--router auto`)
serve the same app with the same workers. Each round runs
`wrk -t1 -cC -dDs --latency` from the 4 client namespaces at once against
one server, then the next; the order rotates every round so that the shared
machine's drift hits each alike (as bench/throughput.py does). Keep-alive
only: the per-request cost is what tracemalloc adds to.

`--settings off,types,off` measures any list of settings (repeats allowed:
two `off` servers show how far apart identical servers land on this
machine, the noise floor of the ratios); ratios are against the first.

Reported, min-median-max over the rounds:
* req/s, and req/s over the first server's in the same round (the overhead
  as a ratio);
* server CPU per 1000 requests (utime + stime of the master and the workers,
  from /proc), and its ratio to the first server's in the same round;
* how busy the whole machine was during the round (/proc/stat);
* the workers' RSS after each round (VmRSS, summed over the workers).

At the end every server is reloaded (`kill -HUP`): its old workers drain
and, with types or tracemalloc, send their leak report. The cost of each
census (the worker logs "leak census (MODE): baseline|final census of N
objects|blocks in T ms (RSS +K KiB)") is read from the logs: the baseline
census at boot, the final one after the rounds' requests. The reports
themselves are printed too: for a clean app they should not be significant.

Writes bench/results/leak_overhead-<time>.json.
"""

from __future__ import annotations

import argparse
import re
import signal
import time

import common
from common import netns

APP = "examples/hello.py:application"
SETTINGS = "off,types,tracemalloc"
CENSUS = re.compile(r"\[(\d+)\] \[INFO\] leak census \((\w+)\): (baseline|final) census of "
                    r"(\d+) (?:objects|blocks) in (\d+) ms \(RSS ([+-]\d+) KiB\)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds per setting (default 3)")
    p.add_argument("--duration", type=float, default=5, help="seconds per round (default 5)")
    p.add_argument("--connections", type=int, default=50,
                   help="wrk connections per client namespace (default 50; 4 namespaces)")
    p.add_argument("--workers", type=int, default=2, help="workers of each server (default 2)")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per server (default 2)")
    p.add_argument("--app", default=APP, help=f"the app every server serves (default {APP})")
    p.add_argument("--router", default="auto",
                   choices=("auto", "nft", "iptables", "iptc", "reuseport"))
    p.add_argument("--settings", default=SETTINGS,
                   help=f"comma-separated leak_report values, one server each, repeats allowed; "
                        f"ratios are against the first (default {SETTINGS})")
    args = p.parse_args(argv)
    args.settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    if not args.settings or any(x not in ("off", "types", "tracemalloc") for x in args.settings):
        p.error("--settings: a comma-separated list of off, types, tracemalloc")
    return args


class Server:
    def __init__(self, tb, setting: str, port: int, args, name: str):
        self.setting, self.port, self.name = setting, port, name
        self.label = f"leak_report = {name}"
        self.proc = netns.start_ipserve(
            tb, [args.app, "-w", str(args.workers), "-b", f"0.0.0.0:{port}",
                 "--router", args.router, "--leak-report", setting])
        self.rounds: list[dict] = []

    def pids(self) -> list[int]:
        return sorted({self.proc.pid, *common.ipserve_worker_pids(self.proc)})

    def worker_rss_kib(self) -> int:
        return sum(common.rss_kib(pid) or 0 for pid in common.ipserve_worker_pids(self.proc))

    def stop(self) -> None:
        self.proc.stop(timeout=15)
        self.proc.cleanup()


def measure(tb, wrk, server: Server, args, rnd: int) -> dict:
    pids = server.pids()
    cpu0, sys0 = common.cpu_seconds(pids), common.system_cpu()
    load = common.run_load(tb, wrk, server.port, args.duration, args.connections)
    cpu = common.cpu_seconds(pids) - cpu0
    machine = common.system_busy(sys0, common.system_cpu())
    rec = {"round": rnd, "rps": round(load.rps, 1), "requests": load.requests,
           "machine_busy": machine["busy"], "machine_steal": machine["steal"],
           "errors": load.error_dict(), "server_cpu_s": round(cpu, 2),
           "cpu_ms_per_1k_req": round(1e6 * cpu / load.requests, 1) if load.requests else None,
           "p99_ms": load.p99_ms, "worker_rss_kib": server.worker_rss_kib()}
    print(f"bench: round {rnd} {server.label:<26} {load.rps:8.0f} req/s  errors {load.errors:<4} "
          f"server CPU {cpu:5.1f}s  workers' RSS {rec['worker_rss_kib'] / 1024:.1f} MiB  "
          f"machine busy {100 * machine['busy']:.0f}%",
          flush=True)
    return rec


def per_round_ratio(server: Server, base: Server, key: str) -> dict | None:
    by_round = {r["round"]: r for r in base.rounds}
    return common.mmm(round(r[key] / by_round[r["round"]][key], 3) for r in server.rounds
               if r.get(key) and by_round.get(r["round"], {}).get(key))


def reload_and_collect(servers: list[Server], workers: int) -> dict:
    """HUP every server, wait until its old workers are gone (and, when it
    reports, their reports are in), then read the census lines of its log."""
    for s in servers:
        s.proc.send_signal(signal.SIGHUP)
    out = {}
    for s in servers:
        want = 0 if s.setting == "off" else workers
        st = s.proc.wait_for(
            lambda st, want=want: len(netns.active_workers(st, 2)) >= workers
            and not any(w["generation"] == 1 for w in st["workers"])
            and len(st.get("leak_reports") or []) >= want,
            timeout=60, what="the old generation's workers gone and their leak reports in")
        censuses = [{"pid": int(m[1]), "which": m[3], "objects": int(m[4]), "ms": int(m[5]),
                     "rss_kib": int(m[6])}
                    for m in CENSUS.finditer(s.proc.log_text()) if m[2] == s.setting]
        out[s.name] = {"censuses": censuses, "reports": st.get("leak_reports") or []}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    wrk, _ = common.preflight(need_gunicorn=False)
    started = time.time()
    machine = common.machine()
    print(f"bench: {common.describe_code(machine)}", flush=True)
    tb = common.make_testbed(4)
    servers: list[Server] = []
    try:
        for i, setting in enumerate(args.settings):
            name = setting if args.settings.count(setting) == 1 else \
                f"{setting}#{args.settings[:i + 1].count(setting)}"
            servers.append(Server(tb, setting, 8201 + i, args, name))
        for s in servers:
            s.proc.wait_ready(args.workers, timeout=60)
            common.wait_http(tb, s.port)
        print(f"bench: testbed {tb.server_ns}, 4 client namespaces x wrk -t1 -c{args.connections} "
              f"-d{args.duration:g}s; {args.app}, {args.workers} workers per server; "
              f"{args.rounds} rounds", flush=True)
        for s in servers:
            if args.warmup > 0:
                common.run_load(tb, wrk, s.port, args.warmup, args.connections)
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for s in order:
                s.rounds.append(measure(tb, wrk, s, args, r + 1))
        after = reload_and_collect(servers, args.workers)
    finally:
        common.stop_all(servers, tb)

    first = servers[0]
    summary = []
    for s in servers:
        summary.append({
            "setting": s.name, "rps": common.mmm(r["rps"] for r in s.rounds),
            "rps_over_first": per_round_ratio(s, first, "rps"),
            "cpu_ms_per_1k_req": common.mmm(r["cpu_ms_per_1k_req"] for r in s.rounds),
            "cpu_over_first": per_round_ratio(s, first, "cpu_ms_per_1k_req"),
            "worker_rss_mib": common.mmm(round(r["worker_rss_kib"] / 1024, 1) for r in s.rounds),
            "machine_busy": common.mmm(r["machine_busy"] for r in s.rounds),
            "errors": sum(sum(r["errors"].values()) for r in s.rounds),
            "rounds": s.rounds, **after[s.name]})
    print()
    print(render(summary, args))
    path = common.write_json("leak_overhead", {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": machine, "args": vars(args), "settings": summary})
    print(f"\nbench: results in {path}")
    return 0


def render(summary: list[dict], args) -> str:
    first = summary[0]["setting"]
    rows = [["leak_report", "req/s", f"req/s / {first}", "CPU ms/1k req", f"CPU / {first}",
             f"RSS MiB ({args.workers} workers)", "machine busy %", "wrk errors"]]
    for s in summary:
        busy = s["machine_busy"] and {k: 100 * v for k, v in s["machine_busy"].items()}
        rows.append([s["setting"], common.fmt_mmm(s["rps"]), common.fmt_mmm(s["rps_over_first"], "{:.3f}"),
                     common.fmt_mmm(s["cpu_ms_per_1k_req"], "{:.1f}"), common.fmt_mmm(s["cpu_over_first"], "{:.3f}"),
                     common.fmt_mmm(s["worker_rss_mib"], "{:.1f}"), common.fmt_mmm(busy), str(s["errors"])])
    head = (f"keep-alive, {args.app}, 4 client namespaces x wrk -t1 -c{args.connections}, "
            f"{args.rounds} rounds x {args.duration:g}s; min–median–max over rounds "
            f"(ratios: per round, against {first} in the same round)")
    out = [head, common.table(rows), ""]
    for s in summary:
        for which in ("baseline", "final"):
            cs = [c for c in s["censuses"] if c["which"] == which]
            if cs:
                out.append(f"{s['setting']} {which} census: "
                           f"{common.fmt_mmm(common.mmm(c['objects'] for c in cs))} "
                           f"{'blocks' if s['setting'].startswith('tracemalloc') else 'objects'} in "
                           f"{common.fmt_mmm(common.mmm(c['ms'] for c in cs))} ms, RSS "
                           f"{common.fmt_mmm(common.mmm(c['rss_kib'] for c in cs), '{:+.0f}')} KiB "
                           f"({len(cs)} censuses)")
        for rep in s["reports"]:
            grew = ", ".join(f"{g['what']} {g['count']:+d}" for g in rep["growth"][:3]) or "nothing"
            out.append(f"{s['setting']} report of pid {rep['pid']} after {rep['requests']} "
                       f"requests: significant={rep['significant']}; grew: {grew}")
    out.append("CPU: utime+stime of the master and all workers (/proc), per 1000 requests. "
               "RSS: the workers' VmRSS after each round, summed.")
    return "\n".join(out)


if __name__ == "__main__":
    common.run_main(main)
