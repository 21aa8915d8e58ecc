#!/usr/bin/env python3
"""Reload under load: ipserve `kill -HUP` versus gunicorn `kill -HUP`.

    sudo .venv/bin/python bench/reload.py [--hup-at 5] [--ws-hold 15]
        [--connections 50] [--router auto] [--graceful-timeout 10]

Both servers run the probe app (tests/apps/probe.py: `/` answers JSON with
the worker's pid and generation, `/ws` is a WebSocket echo) with 2 workers.
For each server, in turn:

1. a WebSocket is opened from client address 198.18.0.16 and echoes once;
2. one `wrk -t1 -cC` per client namespace (4, distinct source addresses)
   starts and runs for --hup-at + --ws-hold seconds;
3. after --hup-at seconds the master gets SIGHUP;
4. meanwhile, every 50 ms: the master's status is polled (ipserve: the
   control socket, the same request `ipservectl status --json` makes;
   gunicorn: the master's child processes), and one HTTP request with
   `Connection: close` is sent from an address of each slot, to see when
   clients really reach the new workers; every 250 ms the WebSocket must echo.

Reported: wrk's errors over the whole run (the run includes the HUP;
without a HUP both servers make none), for ipserve the reload time from
`status.reload.seconds` and measured from outside (HUP until every slot's
route points at a new worker, and until each client address is answered by
the new generation), for gunicorn the time until its new workers run and
until its old ones are gone; and for both, whether the WebSocket was cut
(gunicorn: after --graceful-timeout) or still echoes --ws-hold seconds after
the HUP (ipserve: from the retiring worker, which status shows with the
connection).

Writes bench/results/reload-<time>.json.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import common
from common import netns

from ipserve import control  # noqa: E402  (common put the repository on sys.path)

PROBE_PATH_APP = netns.PROBE_APP                  # tests/apps/probe.py:application (absolute)
PROBE_MODULE_APP = "tests.apps.probe:application"  # gunicorn, with --chdir repo root
WS_WORKER = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hup-at", type=float, default=5, help="seconds of load before the HUP")
    p.add_argument("--ws-hold", type=float, default=15,
                   help="seconds after the HUP the WebSocket is watched (and wrk runs)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections per client namespace")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--router", default="auto",
                   choices=("auto", "nft", "iptables", "iptc", "reuseport"))
    p.add_argument("--graceful-timeout", type=float, default=10,
                   help="gunicorn --graceful-timeout for the run (default 10)")
    p.add_argument("--ipserve-arg", action="append", default=[],
                   help="extra argument for ipserve (repeatable), e.g. --ipserve-arg=--retired-nice=0")
    p.add_argument("--only", choices=("ipserve", "gunicorn"), default=None)
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the run of the same length without a HUP that comes first")
    args = p.parse_args(argv)
    if args.ws_hold <= args.graceful_timeout:
        p.error("--ws-hold must be longer than --graceful-timeout, or gunicorn's cut is not seen")
    return args


# --------------------------------------------------------------------------- #
# Watchers (threads), all timed from the HUP
# --------------------------------------------------------------------------- #

class Clock:
    def __init__(self):
        self.t0: float | None = None

    def since(self) -> float | None:
        return None if self.t0 is None else round(time.monotonic() - self.t0, 3)


class WsWatch(threading.Thread):
    """Echo on one WebSocket every `interval`; note when it stops working."""

    def __init__(self, ws, clock: Clock, until: float, interval: float = 0.25):
        super().__init__(daemon=True)
        self.ws, self.clock, self.until, self.interval = ws, clock, until, interval
        self.echoes = 0
        self.echoes_after_hup = 0
        self.last_ok_after_hup: float | None = None
        self.cut_after: float | None = None     # seconds after HUP
        self.cut_how = ""
        self.stop = threading.Event()

    def run(self):
        n = 0
        while not self.stop.is_set() and time.monotonic() < self.until:
            n += 1
            msg = f"ping {n}"
            try:
                self.ws.send(msg)
                got = self.ws.recv()
                if got != msg:
                    raise ValueError(f"echo {got!r} for {msg!r}")
                self.echoes += 1
                if self.clock.t0 is not None:
                    self.echoes_after_hup += 1
                    self.last_ok_after_hup = self.clock.since()
            except Exception as exc:             # noqa: BLE001
                self.cut_after = self.clock.since()
                self.cut_how = f"{type(exc).__name__}: {exc}"[:200]
                return
            self.stop.wait(self.interval)


class HttpWatch(threading.Thread):
    """GET / with Connection: close from each address every 50 ms; record the
    answering pid (and ipserve generation) over time."""

    def __init__(self, clock: Clock, sources, port: int, until: float, interval: float = 0.05):
        super().__init__(daemon=True)
        self.clock, self.sources, self.port = clock, sources, port
        self.until, self.interval = until, interval
        self.samples: dict[str, list[tuple[float, int | None, int | None]]] = {s[1]: [] for s in sources}
        self.failures: dict[str, int] = {s[1]: 0 for s in sources}
        self.stop = threading.Event()

    def run(self):
        # One thread per source address, so a slow answer to one does not
        # delay the samples of the other.
        threads = [threading.Thread(target=self._probe, args=s, daemon=True) for s in self.sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _probe(self, ns, src, dst):
        while not self.stop.is_set() and time.monotonic() < self.until:
            sent = self.clock.since()            # when the connection was opened
            try:
                who = netns.http_json(ns, src, dst, self.port, "/", timeout=2)
                gen = (who.get("worker") or {}).get("generation")
                self.samples[src].append((sent, who.get("pid"), gen, self.clock.since()))
            except Exception:                    # noqa: BLE001
                self.failures[src] += 1
            self.stop.wait(self.interval)

    def first_after(self, src: str, pred) -> float | None:
        for t, pid, gen, _ in self.samples[src]:
            if t is not None and pred(pid, gen):
                return t
        return None

    def around(self, lo: float, hi: float) -> dict:
        """The samples (sent, pid, generation, answered) sent between lo and hi s after HUP."""
        return {src: [s for s in rows if s[0] is not None and lo <= s[0] <= hi]
                for src, rows in self.samples.items()}


class IpserveStatusWatch(threading.Thread):
    """Poll the master's status over its control socket every 50 ms."""

    def __init__(self, clock: Clock, sock_path: str, until: float, interval: float = 0.05):
        super().__init__(daemon=True)
        self.clock, self.path, self.until, self.interval = clock, sock_path, until, interval
        self.new_gen: int | None = None
        self.slot_switched: dict[int, float] = {}
        self.all_switched: float | None = None
        self.reload_done_seen: float | None = None
        self.reload: dict | None = None
        self.polls = 0
        self.errors = 0
        self.worst_lag: dict[int, dict] = {}   # pid -> worst hub lag a heartbeat reported
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and time.monotonic() < self.until:
            try:
                st, _ = control.request(self.path, {"cmd": "status"}, timeout=2)
            except Exception:                    # noqa: BLE001
                self.errors += 1
                self.stop.wait(self.interval)
                continue
            self.polls += 1
            t = self.clock.since()
            for w in st.get("workers", []):
                worst = self.worst_lag.get(w["pid"])
                if worst is None or (w.get("lag_ms") or 0) > worst["lag_ms"]:
                    self.worst_lag[w["pid"]] = {"lag_ms": w.get("lag_ms") or 0, "at_s": t,
                                                "slot": w["slot"], "generation": w["generation"],
                                                "state": w["state"], "nice": w.get("nice")}
            if t is not None:
                self.check(st, t)
            self.stop.wait(self.interval)

    def check(self, st: dict, t: float):
        gen = st["master"]["generation"]
        if self.new_gen is None or gen != self.new_gen:
            if gen == self.new_gen_expected:
                self.new_gen = gen
            else:
                return
        new_ports = {w["port"]: w["slot"] for w in st["workers"]
                     if w["generation"] == self.new_gen and w["state"] == "active"}
        for slot, port in st.get("routes", {}).items():
            if port in new_ports and int(slot) not in self.slot_switched:
                self.slot_switched[int(slot)] = t
        if self.all_switched is None and len(self.slot_switched) >= st["slots"]:
            self.all_switched = t
        r = st.get("reload") or {}
        if r.get("generation") == self.new_gen and r.get("state") in ("done", "failed"):
            if self.reload_done_seen is None:
                self.reload_done_seen = t
            self.reload = r


# --------------------------------------------------------------------------- #
# The two runs
# --------------------------------------------------------------------------- #

def wrk_summary(result) -> dict:
    return {"requests": result.requests, "rps": round(result.rps, 1),
            "errors": result.error_dict(), "errors_total": result.errors,
            "per_client": [{"requests": r.requests, "timeout": r.timeout, "read": r.read,
                            "connect": r.connect, "p99_ms": r.latency_p99_ms,
                            "max_ms": _max_latency(r.raw)} for r in result.per_client]}


def _max_latency(raw: str) -> float | None:
    import re
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", raw, re.M)
    return common._ms(m.group(1)) if m else None


def baseline(tb, wrk, args, port) -> dict | None:
    """The same load for the same time, without a HUP: errors the server makes anyway."""
    if args.no_baseline:
        return None
    return wrk_summary(common.run_load(tb, wrk, port, args.hup_at + args.ws_hold, args.connections))


def socket_snapshot(tb) -> dict:
    """Server-side TCP sockets right now: listen queues (connections waiting
    for accept()) and established connections by local port, with or without
    an owning process, so connections nobody will ever serve show up."""
    import collections
    out = tb.call_in(tb.server_ns, ["ss", "-tanpH"], check=False).stdout
    listen, est = {}, collections.Counter()
    for line in out.splitlines():
        f = line.split()
        if len(f) < 5:
            continue
        lport = f[3].rsplit(":", 1)[1]
        owner = line.split("pid=")[1].split(",")[0] if "pid=" in line else "none"
        if f[0] == "LISTEN":
            listen[lport] = {"queued": int(f[1]), "pid": owner}
        elif f[0] == "ESTAB":
            est[f"{lport} pid {owner}"] += 1
    return {"listen": listen, "established": dict(est)}


def ws_open(tb, port):
    c = tb.clients[0]
    ws = netns.ws_connect(c.ns, c.ips[0], c.server_ip, port, "/ws", timeout=5)
    ws.send("hello")
    if ws.recv() != "hello":
        raise netns.HarnessError("the WebSocket did not echo")
    return ws


def slot_sources(tb, workers):
    """One (ns, src, dst) per slot: client 0's addresses .16, .17, ... (low bits 0, 1, ...)."""
    c = tb.clients[0]
    return [(c.ns, c.ips[i], c.server_ip) for i in range(workers)]


def run_ipserve(tb, wrk, args, port) -> dict:
    proc = netns.start_ipserve(tb, [PROBE_PATH_APP, "-w", str(args.workers), "-b", f"0.0.0.0:{port}",
                                    "--router", args.router, *args.ipserve_arg])
    try:
        st = proc.wait_ready(args.workers, timeout=60)
        old_gen = st["master"]["generation"]
        old = {w["slot"]: w["pid"] for w in netns.active_workers(st)}
        common.wait_http(tb, port)
        base = baseline(tb, wrk, args, port)
        ws = ws_open(tb, port)
        clock = Clock()
        total = args.hup_at + args.ws_hold
        end = time.monotonic() + total + 1
        ws_watch = WsWatch(ws, clock, until=end)
        http_watch = HttpWatch(clock, slot_sources(tb, args.workers), port, until=end)
        status_watch = IpserveStatusWatch(clock, control.socket_path(proc.runtime_dir, proc.name),
                                          until=end)
        status_watch.new_gen_expected = old_gen + 1
        load = common.Load(tb, wrk, port, total, args.connections)
        for w in (ws_watch, http_watch, status_watch):
            w.start()
        time.sleep(args.hup_at)
        clock.t0 = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        time.sleep(3)
        sockets_3s = socket_snapshot(tb)
        result = load.wait()
        for w in (ws_watch, http_watch, status_watch):
            w.join(timeout=max(0.0, end - time.monotonic()) + 5)
        # The WebSocket's worker: still there, retiring, holding it?
        st = proc.status()
        retiring = [w for w in st["workers"] if w["state"] == "retiring"]
        ws_still = ws_watch.cut_after is None
        try:
            ws.send("after"); ws_still = ws_still and ws.recv() == "after"
        except Exception:                        # noqa: BLE001
            ws_still = False
        ws.close()
        new_gen = status_watch.new_gen
        client_switch = {src: http_watch.first_after(src, lambda pid, gen: gen == new_gen)
                         for _, src, _ in http_watch.sources}
        out = {
            "server": " ".join([f"ipserve -w {args.workers} --router {args.router}", *args.ipserve_arg]),
            "router": st["router"],
            "wrk": wrk_summary(result), "wrk_baseline_no_hup": base,
            "reload_status": status_watch.reload,
            "reload_seconds_status": (status_watch.reload or {}).get("seconds"),
            "external_all_slots_routed_s": status_watch.all_switched,
            "external_slot_routed_s": status_watch.slot_switched,
            "external_reload_done_seen_s": status_watch.reload_done_seen,
            "client_first_new_generation_s": client_switch,
            "probe_failures": http_watch.failures,
            "probe_samples_around_switch": http_watch.around(-0.5, 3.0),
            "status_polls": status_watch.polls,
            "worst_hub_lag_by_worker": status_watch.worst_lag,
            "ws": {"cut_after_s": ws_watch.cut_after, "cut_how": ws_watch.cut_how,
                   "echoes_after_hup": ws_watch.echoes_after_hup,
                   "last_echo_after_hup_s": ws_watch.last_ok_after_hup,
                   "still_echoing_at_end": ws_still},
            "retiring_workers": [{k: w.get(k) for k in ("pid", "slot", "generation", "connections",
                                                        "nice", "state")} for w in retiring],
            "old_workers": old,
            "sockets_3s_after_hup": sockets_3s,
        }
        proc.stop(timeout=30)
        out["log"] = common.keep_log(proc.log_path, "reload-ipserve")
        return out
    finally:
        proc.cleanup()


def run_gunicorn(tb, wrk, gunicorn, args, port) -> dict:
    g = common.Gunicorn(tb, gunicorn, PROBE_MODULE_APP, port, workers=args.workers,
                        worker_class=WS_WORKER,
                        extra=["--graceful-timeout", f"{args.graceful_timeout:g}",
                               "--log-level", "info"])
    try:
        common.wait_http(tb, port)
        deadline = time.monotonic() + 30
        while len(g.worker_pids()) < args.workers and time.monotonic() < deadline:
            time.sleep(0.1)
        base = baseline(tb, wrk, args, port)
        old = set(g.worker_pids())
        ws = ws_open(tb, port)
        clock = Clock()
        total = args.hup_at + args.ws_hold
        end = time.monotonic() + total + 1
        ws_watch = WsWatch(ws, clock, until=end)
        http_watch = HttpWatch(clock, slot_sources(tb, args.workers), port, until=end)
        kids = {"new_running": None, "old_gone": None, "timeline": []}

        def watch_children():
            last = None
            while time.monotonic() < end:
                pids = set(g.worker_pids())
                t = clock.since()
                if t is not None:
                    if pids != last:
                        kids["timeline"].append((t, sorted(pids)))
                        last = pids
                    if kids["new_running"] is None and len(pids - old) >= args.workers:
                        kids["new_running"] = t
                    if kids["old_gone"] is None and not (pids & old):
                        kids["old_gone"] = t
                time.sleep(0.05)

        child_watch = threading.Thread(target=watch_children, daemon=True)
        load = common.Load(tb, wrk, port, total, args.connections)
        for w in (ws_watch, http_watch, child_watch):
            w.start()
        time.sleep(args.hup_at)
        clock.t0 = time.monotonic()
        g.proc.send_signal(signal.SIGHUP)
        result = load.wait()
        for w in (ws_watch, http_watch, child_watch):
            w.join(timeout=max(0.0, end - time.monotonic()) + 5)
        try:
            ws.close()
        except Exception:                        # noqa: BLE001
            pass
        client_switch = {src: http_watch.first_after(src, lambda pid, gen: pid not in old)
                         for _, src, _ in http_watch.sources}
        last_old = {src: max((t for t, pid, _, _ in http_watch.samples[src]
                              if t is not None and pid in old), default=None)
                    for _, src, _ in http_watch.sources}
        return {
            "server": f"gunicorn -k {WS_WORKER} -w {args.workers} "
                      f"--graceful-timeout {args.graceful_timeout:g}",
            "wrk": wrk_summary(result), "wrk_baseline_no_hup": base,
            "new_workers_running_s": kids["new_running"],
            "old_workers_gone_s": kids["old_gone"],
            "children_timeline": kids["timeline"],
            "client_first_new_worker_s": client_switch,
            "client_last_old_worker_s": last_old,
            "probe_failures": http_watch.failures,
            "ws": {"cut_after_s": ws_watch.cut_after, "cut_how": ws_watch.cut_how,
                   "echoes_after_hup": ws_watch.echoes_after_hup,
                   "last_echo_after_hup_s": ws_watch.last_ok_after_hup,
                   "still_echoing_at_end": ws_watch.cut_after is None},
            "log_tail": g.log_tail(15),
        }
    finally:
        g.stop()


def render(res: dict, args) -> str:
    ip, gu = res.get("ipserve"), res.get("gunicorn")

    def errs(r):
        e = r["wrk"]["errors"]
        return (f"{r['wrk']['errors_total']} (connect {e['connect']}, read {e['read']}, "
                f"write {e['write']}, timeout {e['timeout']}, non-2xx {e['non2xx']}) "
                f"of {r['wrk']['requests']} requests")

    def s(x):
        return "-" if x is None else f"{x:.2f}s"

    rows = [["", "ipserve" if ip else "", "gunicorn" if gu else ""]]
    ip_label = ""
    if ip:
        ip_label = ip["server"] if ip["router"] in ip["server"] else f"{ip['server']} ({ip['router']})"
    rows.append(["server", ip_label, gu["server"] if gu else ""])
    rows.append(["wrk errors over the run (HUP inside)", errs(ip) if ip else "", errs(gu) if gu else ""])
    if (ip or gu or {}).get("wrk_baseline_no_hup"):
        rows.append(["wrk errors, same load and length, no HUP",
                     errs({"wrk": ip["wrk_baseline_no_hup"]}) if ip else "",
                     errs({"wrk": gu["wrk_baseline_no_hup"]}) if gu else ""])
    if ip:
        rows.append(["HUP -> every slot switched (status.reload.seconds)",
                     s(ip["reload_seconds_status"]), ""])
        rows.append(["HUP -> every slot routed to new gen (polled status)",
                     s(ip["external_all_slots_routed_s"]), ""])
    rows.append(["HUP -> client addresses answered by new workers",
                 ", ".join(s(v) for v in ip["client_first_new_generation_s"].values()) if ip else "",
                 ", ".join(s(v) for v in gu["client_first_new_worker_s"].values()) if gu else ""])
    if gu:
        rows.append(["HUP -> all new workers running / all old gone", "",
                     f"{s(gu['new_workers_running_s'])} / {s(gu['old_workers_gone_s'])}"])

    def ws(r):
        w = r["ws"]
        if w["cut_after_s"] is not None:
            return f"CUT {w['cut_after_s']:.2f}s after HUP"
        return (f"still echoing {w['last_echo_after_hup_s']:.1f}s after HUP "
                f"({w['echoes_after_hup']} echoes)")
    rows.append(["WebSocket opened before the HUP", ws(ip) if ip else "", ws(gu) if gu else ""])
    if ip and ip["retiring_workers"]:
        r = ip["retiring_workers"]
        rows.append(["old workers at the end (ipserve status)",
                     "; ".join(f"pid {w['pid']} slot {w['slot']} gen {w['generation']} "
                               f"{w['state']} nice {w['nice']} conns {w['connections']}" for w in r), ""])
    head = (f"reload under load: 4 client namespaces x wrk -t1 -c{args.connections} for "
            f"{args.hup_at + args.ws_hold:g}s, HUP at {args.hup_at:g}s, {args.workers} workers, probe app")
    return head + "\n" + common.table(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    wrk, gunicorn = common.preflight(need_gunicorn=args.only != "ipserve")
    started = time.time()
    res: dict = {}
    tb = common.make_testbed(4)
    try:
        if args.only in (None, "ipserve"):
            res["ipserve"] = run_ipserve(tb, wrk, args, 8301)
            print(f"bench: ipserve done: {res['ipserve']['wrk']}", flush=True)
        if args.only in (None, "gunicorn"):
            res["gunicorn"] = run_gunicorn(tb, wrk, gunicorn, args, 8302)
            print(f"bench: gunicorn done: {res['gunicorn']['wrk']}", flush=True)
    finally:
        tb.close()
    print()
    print(render(res, args))
    path = common.write_json("reload", {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": common.machine(), "args": vars(args), **res})
    print(f"\nbench: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
