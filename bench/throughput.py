#!/usr/bin/env python3
"""Hello-world throughput: ipserve -w 2 against gunicorn -k gevent and
-k gevent_pywsgi (-w 2), keep-alive and one request per connection.

    sudo .venv/bin/python bench/throughput.py [--mode both|keepalive|close]
        [--duration 6] [--rounds 5] [--connections 50] [--workers 2]
        [--router auto] [--rate R] [--gunicorn-class gevent --gunicorn-class gevent_pywsgi]

Load comes from 4 client namespaces (source addresses 198.18.k.(16+k), so
two land on each ipserve slot), one `wrk -t1 -cC -dDs --latency` per
namespace, all four at once, each to the server address on its own veth
link. Every server serves examples/hello.py:application, and all of them run
for the whole benchmark (on different ports). Rounds interleave the servers
(the order rotates every round) so that drift in the shared machine's load
hits each alike; within a round both modes are measured, keep-alive first.

Modes: `keepalive` (wrk's default: HTTP/1.1, connections reused) and
`close` (every request carries `Connection: close`, so every request is a new
TCP connection: accept, the NAT rule and connection tracking, teardown).

Reported per server and mode, over the rounds: requests/s min-median-max;
ipserve / the faster gunicorn *in the same round* (min-median-max of the
per-round ratios, so drift cancels); p99 latency (the worst of the 4 clients'
p99 in a round; median over rounds); server CPU per 1000 requests (utime +
stime from /proc of the master and every worker); the slowest client
namespace's share of an even quarter (fairness); wrk's errors. Also, once
per server, whether a `Connection: close` request is answered with
`Connection: close` and the connection closed.

Without --rate the load is a closed loop over the same connection count for
every server: each server's p99 is at its own saturation point. --rate R
offers R requests/s to every server (R/4 per client namespace): with wrk2
(-R) if it is installed, else with a pacing Lua script for wrk (see
common.pacing_script); then p99 compares the servers at the same offered load.

Writes bench/results/throughput-<time>.json.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time

import common
from common import netns

APP = "examples/hello.py:application"      # ipserve: path form
GUNICORN_APP = "examples.hello:application"  # gunicorn: module form, --chdir repo root
# issue 9: >= 2.0x the faster gunicorn gevent worker with keep-alive, >= 1.5x
# with Connection: close on every request.
GOALS = {"keepalive": 2.0, "close": 1.5}

MODES = {"keepalive": [], "close": ["Connection: close"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("both", "keepalive", "close"), default="both",
                   help="keep-alive, Connection: close on every request, or both (default)")
    p.add_argument("--duration", type=float, default=6, help="seconds per round (default 6)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds per server and mode (default 5; short interleaved rounds follow "
                        "the shared machine's drift better than long ones)")
    p.add_argument("--connections", type=int, default=50,
                   help="wrk connections per client namespace (default 50; 4 namespaces)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads per client namespace")
    p.add_argument("--workers", type=int, default=2, help="workers of each server (default 2)")
    p.add_argument("--router", action="append", default=None,
                   choices=("auto", "nft", "iptables", "iptc", "reuseport"),
                   help="ipserve router(s) to measure; repeat for several (default: auto)")
    p.add_argument("--gunicorn-class", action="append", default=None,
                   help="gunicorn worker class(es); repeat for several "
                        "(default: gevent and gevent_pywsgi)")
    p.add_argument("--rate", type=float, default=None,
                   help="offered load in requests/s per server, over the 4 clients together "
                        "(wrk2 -R if installed, else paced wrk); default: closed loop, "
                        "as fast as each server answers")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per server (default 2)")
    p.add_argument("--no-gunicorn", action="store_true", help="measure ipserve only")
    p.add_argument("--conntrack-time-wait", type=int, default=10,
                   help="seconds a closed connection stays in the server namespace's connection "
                        "tracking in close mode (default 10; the kernel's is 120)")
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="also run ipserve as of git revision REV (exported to a temporary "
                        "directory), side by side, and report this tree / REV per round: "
                        "the cost of a change, e.g. --baseline HEAD~3 --no-gunicorn")
    p.add_argument("--ipserve-arg", action="append", default=[],
                   help="extra argument for ipserve (repeatable), e.g. --ipserve-arg=--keepalive=30")
    args = p.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    return args


class Target:
    def __init__(self, label, kind, port, handle, pids, stop, baseline=False):
        self.label, self.kind, self.port = label, kind, port
        self.baseline = baseline          # ipserve as of --baseline REV
        self.handle, self.pids, self.stop = handle, pids, stop
        self.rounds: dict[str, list[dict]] = {m: [] for m in MODES}
        self.router_name = None
        self.close_check: dict | None = None


def ipserve_pids(proc: netns.IpserveProcess) -> list[int]:
    """The master and every active worker: all the CPU the server spends."""
    return sorted({proc.pid, *common.ipserve_worker_pids(proc)})


def gunicorn_pids(g: common.Gunicorn) -> list[int]:
    return sorted({g.pid, *common.descendants_of(g.pid)})


def main(argv=None) -> int:
    args = parse_args(argv)
    routers = args.router or ["auto"]
    classes = [] if args.no_gunicorn else (args.gunicorn_class or ["gevent", "gevent_pywsgi"])
    modes = list(MODES) if args.mode == "both" else [args.mode]
    wrk, gunicorn = common.preflight(need_gunicorn=bool(classes))
    wrk2 = shutil.which("wrk2")
    started = time.time()
    code_at_start = common.code_fingerprint()
    machine_at_start = common.machine()       # the commit and dirty files the servers start with
    print(f"bench: {common.describe_code(machine_at_start)}", flush=True)
    tb = common.make_testbed(4)
    script_dir = tempfile.mkdtemp(prefix="ips-bench-")
    tb.add_path(script_dir)
    targets: list[Target] = []
    conntrack_peak = {"count": 0}
    try:
        if "close" in modes:
            tuned = common.tune_clients_for_new_connections(tb)
            print(f"bench: client namespaces: {', '.join(f'{k} = {v}' for k, v in tuned.items())}",
                  flush=True)
            # ipserve's NAT rule makes the kernel track every connection in the
            # server namespace, and a closed one stays 120 s in TIME_WAIT: five
            # close-mode rounds of three servers reach ~200k entries of the
            # (global) nf_conntrack_max 262144, and a faster server would fill
            # it and drop SYNs. This timeout is per namespace.
            key = "net.netfilter.nf_conntrack_tcp_timeout_time_wait"
            was = netns.call_in(tb.server_ns, ["sysctl", "-n", key], check=False).stdout.strip()
            if was:
                got = common.ns_sysctl(tb.server_ns, {key: str(args.conntrack_time_wait)})
                print(f"bench: server namespace: {key} {was} -> {got[key]} s "
                      "(per namespace; see --conntrack-time-wait)", flush=True)
        port = 8100
        for router in routers:
            port += 1
            proc = netns.start_ipserve(
                tb, [APP, "-w", str(args.workers), "-b", f"0.0.0.0:{port}", "--router", router,
                     "--log-level", "warning", *args.ipserve_arg])
            targets.append(Target(f"ipserve --router {router}", "ipserve", port, proc,
                                  (lambda p=proc: ipserve_pids(p)),
                                  (lambda p=proc: (p.stop(timeout=15), p.cleanup()))))
        if args.baseline:
            port += 1
            tree = common.export_revision(args.baseline, script_dir)
            proc = netns.start_ipserve(
                tb, [APP, "-w", str(args.workers), "-b", f"0.0.0.0:{port}", "--router", routers[0],
                     "--log-level", "warning", *args.ipserve_arg], pythonpath=[tree], cwd=tree)
            targets.append(Target(f"ipserve @{args.baseline} --router {routers[0]}", "ipserve", port,
                                  proc, (lambda p=proc: ipserve_pids(p)),
                                  (lambda p=proc: (p.stop(timeout=15), p.cleanup())), baseline=True))
        for cls in classes:
            port += 1
            g = common.Gunicorn(tb, gunicorn, GUNICORN_APP, port, workers=args.workers,
                                worker_class=cls, extra=["--log-level", "warning"])
            targets.append(Target(f"gunicorn -k {cls}", "gunicorn", port, g,
                                  (lambda g=g: gunicorn_pids(g)), g.stop))

        for t in targets:
            if t.kind == "ipserve":
                st = t.handle.wait_ready(args.workers, timeout=60)
                t.router_name = st["router"]
                if t.router_name not in t.label:
                    t.label += f" ({t.router_name})"
            common.wait_http(tb, t.port)

        print(f"bench: testbed {tb.server_ns}, 4 client namespaces, "
              f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency in each; "
              f"modes: {', '.join(modes)}; {args.rounds} rounds", flush=True)
        print(f"bench: {load_model(args, wrk2)}", flush=True)
        est = len(targets) * len(modes) * args.rounds * (args.duration + 0.7) \
            + len(targets) * args.warmup * len(modes)
        print(f"bench: about {est / 60:.1f} min of load", flush=True)
        pinning = check_pinning(tb, targets)
        for t in targets:
            c0 = tb.clients[0]
            t.close_check = common.check_connection_close(c0.ns, None, c0.server_ip, t.port)
            print(f"bench: {t.label}: port {t.port}; {pinning[t.label]}", flush=True)
            print(f"bench: {t.label}: Connection: close request -> "
                  f"{common.describe_close_check(t.close_check)}", flush=True)

        for t in targets:                       # warm-up (not measured)
            for mode in modes:
                if args.warmup > 0:
                    common.run_load(tb, wrk, t.port, args.warmup, args.connections,
                                    threads=args.threads, headers=MODES[mode])

        for r in range(args.rounds):
            for mode in modes:
                order = targets[r % len(targets):] + targets[:r % len(targets)]
                for t in order:
                    rec = measure(tb, wrk, wrk2, t, args, mode, r + 1, script_dir)
                    ct = common.conntrack(tb.server_ns)
                    if ct:
                        rec["conntrack"] = ct
                        if ct["count"] >= conntrack_peak["count"]:
                            conntrack_peak.update(ct)
                    t.rounds[mode].append(rec)
    finally:
        common.stop_all(targets, tb)

    summary = {mode: summarize(targets, mode) for mode in modes}
    print()
    print(render(summary, targets, args, wrk2, conntrack_peak))
    code_now = common.code_fingerprint()
    if code_now != code_at_start:
        print(f"bench: NOTE: the code under ipserve/ changed during the run "
              f"({code_at_start} -> {code_now}); the servers ran what they started with "
              f"({code_at_start})")
    path = common.write_json("throughput", {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": machine_at_start,
        "args": vars(args), "app": APP, "load_model": load_model(args, wrk2), "pinning": pinning,
        "connection_close_check": {t.label: t.close_check for t in targets},
        "conntrack_peak": conntrack_peak, "modes": summary})
    print(f"\nbench: results in {path}")
    return 0


def load_model(args, wrk2) -> str:
    if args.rate is None:
        return (f"closed loop: every server gets the same {4 * args.connections} connections "
                f"({args.connections} per client), each sending its next request as soon as "
                "the last is answered; p99 is each server's latency at its own saturation, "
                "not at the same offered load (wrk2 is " + ("installed" if wrk2 else "not installed")
                + "; --rate R gives a fixed offered load)")
    how = ("wrk2 -R" if wrk2 else
           "wrk with a pacing Lua script (wrk2 is not installed, nor packaged by Debian): "
           "latency is measured from the actual send, without wrk2's correction "
           "for coordinated omission")
    return (f"offered load {args.rate:g} req/s to every server ({args.rate / 4:g} per client, "
            f"over {args.connections} connections each), by {how}; p99 compares the servers "
            "at the same offered load")


def measure(tb, wrk, wrk2, t: Target, args, mode: str, rnd: int, script_dir: str) -> dict:
    pids = t.pids()
    cpu0 = common.cpu_seconds(pids)
    sys0 = common.system_cpu()
    rate = args.rate / len(tb.clients) if args.rate else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = common.run_load(tb, wrk, t.port, args.duration, args.connections,
                           threads=args.threads, headers=MODES[mode], rate=rate,
                           wrk2=wrk2, script_dir=script_dir)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)   # the wrk processes, reaped
    cpu = common.cpu_seconds(pids) - cpu0
    client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    machine = common.system_busy(sys0, common.system_cpu())
    rec = {"round": rnd, "mode": mode, "rps": round(load.rps, 1), "requests": load.requests,
           "errors": load.error_dict(), "server_cpu_s": round(cpu, 2), "server_pids": pids,
           "machine_busy": machine["busy"], "machine_steal": machine["steal"],
           "cpu_ms_per_1k_req": round(1e6 * cpu / load.requests, 1) if load.requests else None,
           "client_cpu_s": round(client_cpu, 2),
           "client_cpu_ms_per_1k_req": (round(1e6 * client_cpu / load.requests, 1)
                                        if load.requests else None),
           "p50_ms": load.p50_ms, "p99_ms": load.p99_ms,
           "per_client_rps": [round(x.rps, 1) for x in load.per_client],
           "per_client_p99_ms": [x.latency_p99_ms for x in load.per_client],
           # the slowest client namespace's share of a fair quarter
           "fairness": round(min(x.rps for x in load.per_client)
                             / (load.rps / len(load.per_client)), 3) if load.rps else 0.0}
    p99 = f"{load.p99_ms:.1f}" if load.p99_ms is not None else "-"
    print(f"bench: round {rnd} {mode:<9} {t.label:<30} {load.rps:8.0f} req/s  p99 {p99:>7} ms  "
          f"errors {load.errors:<4} server CPU {cpu:5.1f}s  "
          f"machine busy {100 * machine['busy']:.0f}% steal {100 * machine['steal']:.0f}%  "
          f"per client {[round(x) for x in rec['per_client_rps']]}", flush=True)
    if load.requests == 0:
        print(load.per_client[0].raw, file=sys.stderr)
    return rec


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


def summarize(targets, mode: str) -> list[dict]:
    """Per server: min/median/max over the rounds; for ipserve also the
    per-round ratios against the best gunicorn of that round."""
    guns = [t for t in targets if t.kind == "gunicorn" and t.rounds[mode]]
    rows = []
    for t in targets:
        rounds = t.rounds[mode]
        if not rounds:
            continue
        row = {"server": t.label, "kind": t.kind, "router": t.router_name, "port": t.port,
               "rps": common.mmm(r["rps"] for r in rounds),
               "p99_ms": common.mmm(r["p99_ms"] for r in rounds),
               "p50_ms": common.mmm(r["p50_ms"] for r in rounds),
               "cpu_ms_per_1k_req": common.mmm(r["cpu_ms_per_1k_req"] for r in rounds),
               "client_cpu_ms_per_1k_req": common.mmm(r["client_cpu_ms_per_1k_req"] for r in rounds),
               "fairness": common.mmm(r["fairness"] for r in rounds),
               "errors": {k: sum(r["errors"][k] for r in rounds) for k in rounds[0]["errors"]},
               "rounds": rounds}
        if t.kind == "ipserve" and guns:
            ratios, cpu_ratios, p99_ratios, faster = [], [], [], []
            for rec in rounds:
                same = [g_rec for g in guns for g_rec in g.rounds[mode]
                        if g_rec["round"] == rec["round"]]
                if not same:
                    continue
                best = max(same, key=lambda x: x["rps"])
                faster.append(next(g.label for g in guns if best in g.rounds[mode]))
                if best["rps"]:
                    ratios.append(rec["rps"] / best["rps"])
                cheapest = min((x["cpu_ms_per_1k_req"] for x in same
                                if x["cpu_ms_per_1k_req"]), default=None)
                if cheapest and rec["cpu_ms_per_1k_req"]:
                    cpu_ratios.append(rec["cpu_ms_per_1k_req"] / cheapest)
                lowest = min((x["p99_ms"] for x in same if x["p99_ms"]), default=None)
                if lowest and rec["p99_ms"]:
                    p99_ratios.append(rec["p99_ms"] / lowest)
            row["ratio_vs_faster_gunicorn"] = common.mmm(round(x, 3) for x in ratios)
            row["cpu_ratio_vs_cheaper_gunicorn"] = common.mmm(round(x, 3) for x in cpu_ratios)
            row["p99_ratio_vs_lower_gunicorn"] = common.mmm(round(x, 3) for x in p99_ratios)
            row["faster_gunicorn_per_round"] = faster
        base = next((b for b in targets if b.baseline and b.rounds[mode]), None)
        if t.kind == "ipserve" and not t.baseline and base is not None:
            by_round = {rec["round"]: rec for rec in base.rounds[mode]}
            row["ratio_vs_baseline"] = common.mmm(
                round(rec["rps"] / by_round[rec["round"]]["rps"], 3) for rec in rounds
                if by_round.get(rec["round"], {}).get("rps"))
            row["cpu_ratio_vs_baseline"] = common.mmm(
                round(rec["cpu_ms_per_1k_req"] / by_round[rec["round"]]["cpu_ms_per_1k_req"], 3)
                for rec in rounds if rec["cpu_ms_per_1k_req"]
                and by_round.get(rec["round"], {}).get("cpu_ms_per_1k_req"))
        rows.append(row)
    return rows


def render(summary: dict, targets, args, wrk2, conntrack_peak) -> str:
    out = []
    for mode, rows_in in summary.items():
        what = "keep-alive" if mode == "keepalive" else "Connection: close on every request"
        out.append(f"{what}: hello world, {args.workers} workers each, 4 client namespaces x "
                   f"wrk -t{args.threads} -c{args.connections}"
                   + (f", offered {args.rate:g} req/s" if args.rate else "")
                   + f", {args.rounds} rounds x {args.duration:g}s; min–median–max over rounds")
        rows = [["server", "req/s", "ipserve/faster gunicorn", "p99 ms",
                 "CPU ms/1k req", "CPU vs cheaper gunicorn", "wrk CPU ms/1k", "slowest client",
                 "errors c/r/w/t/non2xx"]]
        for s in rows_in:
            e = s["errors"]
            rows.append([s["server"], common.fmt_mmm(s["rps"]),
                         common.fmt_mmm(s.get("ratio_vs_faster_gunicorn"), "{:.2f}"),
                         common.fmt_mmm(s["p99_ms"], "{:.1f}"),
                         common.fmt_mmm(s["cpu_ms_per_1k_req"]),
                         common.fmt_mmm(s.get("cpu_ratio_vs_cheaper_gunicorn"), "{:.2f}"),
                         common.fmt_mmm(s["client_cpu_ms_per_1k_req"]),
                         f"{100 * s['fairness']['median']:.0f}%",
                         f"{e['connect']}/{e['read']}/{e['write']}/{e['timeout']}/{e['non2xx']}"])
        out.append(common.table(rows))
        for s in rows_in:
            if s.get("ratio_vs_baseline"):
                out.append(f"  {s['server']}: req/s over ipserve @{args.baseline} of each round "
                           f"{common.fmt_mmm(s['ratio_vs_baseline'], '{:.3f}')}, CPU per request "
                           f"{common.fmt_mmm(s.get('cpu_ratio_vs_baseline'), '{:.3f}')}")
        for s in rows_in:
            ratio = s.get("ratio_vs_faster_gunicorn")
            if ratio:
                faster = ", ".join(sorted(set(x.split()[-1] for x in s["faster_gunicorn_per_round"])))
                p99r = common.fmt_mmm(s.get("p99_ratio_vs_lower_gunicorn"), "{:.2f}")
                if args.rate:
                    out.append(f"  {s['server']}: at {args.rate:g} req/s offered, p99 over the lower "
                               f"gunicorn p99 of each round {p99r}; (req/s is set by --rate: "
                               f"{common.fmt_mmm(ratio, '{:.2f}')} only says whether each kept up)")
                else:
                    goal = GOALS[mode]
                    met = "meets" if ratio["median"] >= goal else "does NOT meet"
                    out.append(f"  {s['server']}: req/s over the faster gunicorn of each round "
                               f"{common.fmt_mmm(ratio, '{:.2f}')} (faster: {faster}); median {met} the "
                               f"{goal:.1f}x goal; p99 over the lower gunicorn p99 {p99r} "
                               "(closed loop: at different loads)")
        out.append("")
    out.append("load: " + load_model(args, wrk2))
    out.append("p99: the worst of the 4 clients' p99 in a round (wrk --latency); "
               "CPU: utime+stime of the master and all workers (/proc), per 1000 requests; "
               "wrk CPU: the 4 wrk processes' (rusage). On a veth pair a packet's receive path "
               "(ipserve's NAT lookup included) runs in the sender's context: a request's is "
               "charged to wrk, a response's to the server")
    for t in targets:
        out.append(f"Connection: close check, {t.label}: {common.describe_close_check(t.close_check)}")
    if "close" in summary and any(t.close_check and not t.close_check["says_close"] for t in targets):
        out.append("  (a server that closes without saying `Connection: close` makes wrk send its "
                   "next request on the closed connection: one read error per request, and a wasted "
                   "round trip and reconnect for the client; with --rate the paced slot is lost)")
    if conntrack_peak.get("max"):
        drops = sum(conntrack_peak.get(k, 0) for k in ("drop", "early_drop", "insert_failed"))
        out.append(f"conntrack in the server namespace: peak {conntrack_peak['count']} entries "
                   f"of max {conntrack_peak['max']}; drops/insert failures {drops}")
    return "\n".join(out)


if __name__ == "__main__":
    common.run_main(main)
