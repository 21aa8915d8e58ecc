#!/usr/bin/env python3
"""TLS: ipserve -w 2 against `gunicorn -k gevent -w 2 --certfile --keyfile`, in the
same run, interleaved rounds.

    sudo .venv/bin/python bench/tls.py [--duration 5] [--rounds 3] [--connections 50]
        [--handshakers 2] [--mode both|handshake|keepalive]

Modes:
  handshake  TLS handshakes/s: `openssl s_time -new -www /` (one HTTP/1.0 request per
             connection, a NEW TLS session every time: no resumption), --handshakers
             processes per client namespace at once. (wrk is not used here: it resumes
             its session on every reconnect, so its "Connection: close" rate measures
             abbreviated handshakes.)
  keepalive  requests/s over TLS with keep-alive: `wrk -t1 -cC --latency https://...`
             per client namespace.

Load comes from 4 client namespaces (source addresses 198.18.k.(16+k): two on each
ipserve slot), all at once. Both servers serve examples/hello.py with the same ECDSA
P-256 certificate (made here by `openssl`) and run for the whole benchmark; rounds
rotate their order so the shared machine's drift hits both alike. Reported per mode:
rate min-median-max over the rounds, ipserve / gunicorn per round (min-median-max of
the ratios), server CPU per 1000 connections or requests (utime+stime of the master
and workers, /proc), errors. Writes bench/results/tls-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
import subprocess
import tempfile
import time

import common
from common import netns

APP = "examples/hello.py:application"
GUNICORN_APP = "examples.hello:application"
MODES = ("handshake", "keepalive")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("both", *MODES), default="both")
    p.add_argument("--duration", type=float, default=5, help="seconds per round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per server and mode (default 3)")
    p.add_argument("--connections", type=int, default=50,
                   help="wrk connections per client namespace, keepalive mode (default 50)")
    p.add_argument("--handshakers", type=int, default=2,
                   help="openssl s_time processes per client namespace, handshake mode (default 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=float, default=1, help="warm-up seconds per server and mode")
    return p.parse_args(argv)


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate (what certbot issues by default now)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=bench"], check=True, capture_output=True)
    os.chmod(directory, 0o755)
    os.chmod(cert, 0o644)
    return cert, key


def wait_https(tb, port: int, timeout: float = 60) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    for c in tb.clients:
        while True:
            try:
                sock = netns.tcp_connect(c.ns, None, c.server_ip, port, timeout=2)
                with ctx.wrap_socket(sock) as tls_sock:
                    tls_sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    # gunicorn answers with the request's version: HTTP/1.0 here.
                    if tls_sock.recv(64)[8:13] == b" 200 ":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise netns.HarnessError(f"no HTTPS 200 on {c.server_ip}:{port} from {c.ns}")
            time.sleep(0.2)


def handshakes(tb, port: int, duration: float, per_ns: int) -> dict:
    """New-session handshakes (each with one request) from every client namespace."""
    procs = []
    for c in tb.clients:
        for _ in range(per_ns):
            procs.append(tb.run_in(c.ns, [
                "openssl", "s_time", "-connect", f"{c.server_ip}:{port}", "-new",
                "-time", f"{duration:g}", "-www", "/"], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True))
    total, failed = 0, 0
    for p in procs:
        out, _ = p.communicate(timeout=duration + 60)
        m = re.search(r"(\d+) connections in [\d.]+ real seconds", out)
        if m:
            total += int(m.group(1))
        else:
            failed += 1
    return {"count": total, "rate": total / duration, "failed_clients": failed}


def keepalive(tb, port: int, duration: float, connections: int, wrk: str) -> dict:
    procs = [tb.run_in(c.ns, [wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout=2s",
                              "--latency", f"https://{c.server_ip}:{port}/"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in tb.clients]
    load = common.LoadResult()
    for p in procs:
        out, _ = p.communicate(timeout=duration + 60)
        load.per_client.append(common.parse_wrk(out or ""))
    return {"count": load.requests, "rate": load.rps, "errors": load.error_dict(),
            "p99_ms": load.p99_ms}


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    wrk, gunicorn = common.preflight(need_gunicorn=True)
    machine = common.machine()
    print(f"bench: {common.describe_code(machine)}; load average {machine['loadavg_at_start']}",
          flush=True)
    tb = common.make_testbed(4)
    certs = tempfile.mkdtemp(prefix="ips-bench-tls-")
    tb.add_path(certs)
    servers: list[dict] = []
    results: dict = {m: {} for m in modes}
    try:
        common.tune_clients_for_new_connections(tb)
        key = "net.netfilter.nf_conntrack_tcp_timeout_time_wait"
        if netns.call_in(tb.server_ns, ["sysctl", "-n", key], check=False).stdout.strip():
            common.ns_sysctl(tb.server_ns, {key: "10"})
        cert, keyfile = make_certificate(certs)
        proc = netns.start_ipserve(tb, [APP, "-w", str(args.workers), "-b", "0.0.0.0:8443",
                                        "--log-level", "warning", "--certfile", cert,
                                        "--keyfile", keyfile])
        servers.append({"label": "ipserve", "port": 8443, "stop": lambda: (proc.stop(timeout=15),
                                                                           proc.cleanup()),
                        "pids": lambda: sorted({proc.pid, *common.ipserve_worker_pids(proc)})})
        g = common.Gunicorn(tb, gunicorn, GUNICORN_APP, 8444, workers=args.workers,
                            worker_class="gevent", extra=["--log-level", "warning",
                                                          "--certfile", cert, "--keyfile", keyfile])
        servers.append({"label": "gunicorn -k gevent", "port": 8444, "stop": g.stop,
                        "pids": lambda: sorted({g.pid, *common.descendants_of(g.pid)})})
        proc.wait_ready(args.workers, timeout=60)
        for s in servers:
            wait_https(tb, s["port"])
        print(f"bench: 4 client namespaces; handshake: {args.handshakers} x openssl s_time -new "
              f"each; keepalive: wrk -t1 -c{args.connections} each; {args.rounds} rounds x "
              f"{args.duration:g}s", flush=True)

        def run(s, mode, duration):
            if mode == "handshake":
                return handshakes(tb, s["port"], duration, args.handshakers)
            return keepalive(tb, s["port"], duration, args.connections, wrk)

        for s in servers:                   # warm-up, not measured
            for mode in modes:
                run(s, mode, args.warmup)
        for r in range(args.rounds):
            for mode in modes:
                order = servers[r % 2:] + servers[:r % 2]
                for s in order:
                    pids = s["pids"]()
                    cpu0, sys0 = common.cpu_seconds(pids), common.system_cpu()
                    rec = run(s, mode, args.duration)
                    cpu = common.cpu_seconds(pids) - cpu0
                    busy = common.system_busy(sys0, common.system_cpu())
                    rec.update(round=r + 1, server_cpu_s=round(cpu, 2),
                               cpu_ms_per_1k=round(1e6 * cpu / rec["count"], 1)
                               if rec["count"] else None, machine_busy=busy["busy"])
                    results[mode].setdefault(s["label"], []).append(rec)
                    print(f"bench: round {r + 1} {mode:<9} {s['label']:<20} {rec['rate']:8.0f}/s  "
                          f"server CPU {cpu:5.1f}s  machine busy {100 * busy['busy']:.0f}%  "
                          f"{rec.get('errors') or ''}{rec.get('failed_clients') or ''}", flush=True)
    finally:
        for s in servers:
            try:
                s["stop"]()
            except Exception as exc:        # noqa: BLE001
                print(f"bench: stopping {s['label']}: {exc}")
        tb.close()

    summary = {}
    print()
    for mode in modes:
        ips, gun = results[mode].get("ipserve", []), results[mode].get("gunicorn -k gevent", [])
        ratios = [a["rate"] / b["rate"] for a, b in zip(ips, gun) if b["rate"]]
        cpu_ratios = [a["cpu_ms_per_1k"] / b["cpu_ms_per_1k"] for a, b in zip(ips, gun)
                      if a["cpu_ms_per_1k"] and b["cpu_ms_per_1k"]]
        summary[mode] = {"ipserve": common.mmm(x["rate"] for x in ips),
                         "gunicorn": common.mmm(x["rate"] for x in gun),
                         "ratio": common.mmm(round(x, 3) for x in ratios),
                         "cpu_ratio": common.mmm(round(x, 3) for x in cpu_ratios),
                         "rounds": results[mode]}
        unit = "new-session handshakes/s" if mode == "handshake" else "keep-alive requests/s"
        print(f"{unit}: ipserve {common.fmt_mmm(summary[mode]['ipserve'])}, gunicorn -k gevent "
              f"{common.fmt_mmm(summary[mode]['gunicorn'])}; ipserve/gunicorn per round "
              f"{common.fmt_mmm(summary[mode]['ratio'], '{:.2f}')}, CPU per unit "
              f"{common.fmt_mmm(summary[mode]['cpu_ratio'], '{:.2f}')}")
    path = common.write_json("tls", {"machine": machine, "args": vars(args), "summary": summary})
    print(f"\nbench: results in {path}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
