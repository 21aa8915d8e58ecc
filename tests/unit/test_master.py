"""The master driven with a fake spawner, fake sockets and a fake router.

Forged and malformed messages, all-or-nothing reloads, back-off, exceptions
inside handlers, stopping mid-reload, adoption and handover. The end-to-end
suites run the same code against real processes and real kernel rules.
"""

from __future__ import annotations

import json
import logging
import signal

import pytest

from ipserve.master import adoption, link, state
from ipserve.master.registry import WorkerState
from master_fakes import (MASTER_UID, FakeSpawner, Peer, booting, exit_worker,
                          heartbeat, hello, make_master, say_ready, sig, start)

NOBODY = 65534
A, R, K = WorkerState.ACTIVE, WorkerState.RETIRING, WorkerState.KILLED


def holders(master) -> dict[int, int]:
    return {s.index: s.holder.pid for s in master.slots if s.holder is not None}


def of_generation(master, generation: int):
    return sorted((w for w in master.registry if w.generation == generation), key=lambda w: w.slot)


# ---------------------------------------------------------------- start-up

def test_every_slot_is_routed_to_its_own_socket_before_any_worker_is_ready(tmp_path):
    master = make_master(tmp_path, workers=4)
    master.begin()
    assert master.router.applied == [{s.index: s.port for s in master.slots}]
    assert len(set(master.router.applied[0].values())) == 4      # no slot shares another's port
    master.tick()
    assert all(w.state is WorkerState.BOOTING for w in master.registry)


def test_a_worker_accepts_only_once_activated_and_never_covers_another_slot(tmp_path):
    master = make_master(tmp_path, workers=4)
    master.begin()
    master.tick()
    first = booting(master)[0]
    peers = say_ready(master, [first])
    assert peers[first.pid].heard() == [{"type": "activate"}]
    assert first.state is A
    # The slots still booting stay routed to their own sockets (clients queue there).
    kernel = master.router.kernel
    assert kernel[first.slot] == first.port
    assert all(kernel[s.index] == s.port and s.holder is not first for s in master.slots
               if s.index != first.slot)


def test_spawns_are_paced_by_cores_not_all_at_once(tmp_path, monkeypatch):
    from ipserve.master import policy
    monkeypatch.setattr(policy, "max_booting", lambda cpu_count=None: 2)
    master = make_master(tmp_path, workers=16)
    master.begin()
    master.tick()
    assert len(master.registry) == 2
    master.tick()
    assert len(master.registry) == 2            # nobody became ready: nothing more starts
    say_ready(master, booting(master))
    master.tick()
    assert len(master.registry) == 4


# ---------------------------------------------------------------- forged and malformed messages

def test_forged_hello_from_an_unknown_pid_changes_nothing(tmp_path, caplog):
    master = make_master(tmp_path, workers=2)
    start(master)
    before_routes, before_holders = dict(master.router.kernel), holders(master)
    forger = Peer(master, pid=424242, uid=NOBODY)
    with caplog.at_level(logging.WARNING):
        forger.say({"type": "hello", "name": master.name, "pid": 424242, "slot": 1,
                    "generation": 99, "phase": "ready", "connections": 0, "requests": 0,
                    "port": 1})
        forger.say(heartbeat())
    assert forger.heard() == [{"type": "refused"}]
    assert forger.closed
    assert master.router.kernel == before_routes and holders(master) == before_holders
    assert all(w.state is A and w.generation == 1 for w in master.registry)
    assert "refused a worker hello from pid 424242" in caplog.text


def test_hello_claiming_another_workers_slot_or_generation_is_refused(tmp_path):
    master = make_master(tmp_path, workers=2)
    start(master)
    w0, w1 = of_generation(master, 1)
    # The real worker of slot 0, claiming slot 1 and a newer generation.
    liar = Peer(master, pid=w0.pid)
    liar.say(hello(w0, slot=1, generation=9))
    assert liar.closed and liar.heard() == [{"type": "refused"}]
    assert holders(master) == {0: w0.pid, 1: w1.pid}
    assert w0.conn is not liar.conn


def test_recycled_pid_is_not_the_worker(tmp_path):
    master = make_master(tmp_path, workers=1)
    start(master)
    (worker,) = master.registry
    worker.process.start_time += 1          # same pid, another process
    impostor = Peer(master, pid=worker.pid)
    impostor.say(hello(worker))
    assert impostor.closed


def test_port_in_a_message_is_never_routed(tmp_path):
    master = make_master(tmp_path, workers=1)
    master.begin()
    master.tick()
    (worker,) = booting(master)
    Peer(master, worker.pid).say(hello(worker, port=22))
    assert master.router.kernel == {0: worker.port} and worker.port != 22


@pytest.mark.parametrize("message", [
    {"type": "heartbeat", "connections": "many", "requests": 1, "lag_ms": 0, "too_busy": False,
     "shed": 0, "websockets": 0, "phase": "active"},
    {"type": "heartbeat", "connections": -1, "requests": 1, "lag_ms": 0, "too_busy": False,
     "shed": 0, "websockets": 0, "phase": "active"},
    {"type": "heartbeat", "connections": 1, "requests": 1, "lag_ms": 1e300, "too_busy": False,
     "shed": 0, "websockets": 0, "phase": "active"},
    {"type": "heartbeat", "connections": 1, "requests": 1, "lag_ms": 0, "too_busy": "yes",
     "shed": 0, "websockets": 0, "phase": "active"},
    {"type": "hello", "pid": True},
    {"type": "take-over-the-world"},
    {"nothing": "here"},
])
def test_malformed_message_closes_that_connection_only(tmp_path, message, caplog):
    master = make_master(tmp_path, workers=2)
    start(master)
    w0, w1 = of_generation(master, 1)
    peer = w0.conn
    with caplog.at_level(logging.WARNING):
        link.on_messages(master, peer, [message])
    assert peer.closed and w0.conn is None
    assert w1.conn is not None and not w1.conn.closed
    assert w0.state is A and holders(master) == {0: w0.pid, 1: w1.pid}
    assert "bad message" in caplog.text or "before saying who it is" in caplog.text


def test_heartbeat_before_hello_is_refused(tmp_path):
    master = make_master(tmp_path, workers=1)
    start(master)
    stranger = Peer(master, pid=999999)
    stranger.say(heartbeat(too_busy=True))
    assert stranger.closed


def test_heartbeat_updates_only_the_sending_worker(tmp_path):
    master = make_master(tmp_path, workers=2)
    start(master)
    w0, w1 = of_generation(master, 1)
    link.on_messages(master, w0.conn, [heartbeat(connections=7, requests=70, too_busy=True)])
    assert (w0.connections, w0.requests, w0.too_busy) == (7, 70, True)
    assert (w1.connections, w1.requests, w1.too_busy) == (0, 0, False)


# ---------------------------------------------------------------- admin commands

def test_admin_commands_only_from_root_or_the_masters_uid(tmp_path, caplog):
    master = make_master(tmp_path, workers=1)
    start(master)
    for command in ("stop", "reload", "handover", "kill-retired", "status"):
        outsider = Peer(master, pid=4242, uid=NOBODY if MASTER_UID != NOBODY else 12345)
        with caplog.at_level(logging.WARNING):
            outsider.say({"cmd": command, "pid": 4242})
        (reply,) = outsider.heard()
        assert reply["ok"] is False and "permission denied" in reply["error"]
    assert not master.pending_signals and not master.handed_over and master.stopping is None
    admin = Peer(master, pid=4243, uid=MASTER_UID)
    admin.say({"cmd": "status"})
    assert admin.heard()[0]["master"]["generation"] == 1


def test_bad_request_gets_an_answer_not_a_crash(tmp_path):
    master = make_master(tmp_path, workers=1)
    start(master)
    admin = Peer(master, pid=4243)
    admin.say({"cmd": "format-disk"})
    (reply,) = admin.heard()
    assert reply["ok"] is False and "bad request" in reply["error"]


def test_handover_refused_while_starting_reloading_or_stopping(tmp_path):
    master = make_master(tmp_path, workers=2)
    master.begin()
    master.tick()
    answer, fds = adoption.handover(master, 77)
    assert answer["ok"] is False and "starting" in answer["error"] and not master.handed_over
    for record in booting(master):
        Peer(master, record.pid).say(hello(record))
    sig(master, signal.SIGHUP)
    answer, _ = adoption.handover(master, 77)
    assert answer["ok"] is False and "reload" in answer["error"]
    master.tick()
    say_ready(master, booting(master))
    master.tick()
    answer, _ = adoption.handover(master, 77)
    assert answer["ok"] is True and master.handed_over
    master.handed_over = False
    sig(master, signal.SIGTERM)
    answer, _ = adoption.handover(master, 77)
    assert answer["ok"] is False and "stopping" in answer["error"]


# ---------------------------------------------------------------- reloads are all-or-nothing

@pytest.mark.parametrize("how", ["exits", "boot_timeout"])
def test_partial_reload_failure_switches_no_slot_and_restores_everything(tmp_path, how):
    master = make_master(tmp_path, workers=4, boot_timeout=30, timeout=0)
    start(master)
    old = of_generation(master, 1)
    routes_before, cfg_before = dict(master.router.kernel), master.cfg
    sig(master, signal.SIGTTIN)                        # 4 -> 8 workers, generation 2
    for _ in range(10):                                # all but slot 5's become ready
        master.tick()
        say_ready(master, [w for w in booting(master) if w.slot != 5])
    new = of_generation(master, 2)
    assert len(new) == 8
    failing = new[5]
    assert failing.state is WorkerState.BOOTING
    master.tick()
    assert master.router.kernel == routes_before       # nothing switches before all are ready
    if how == "exits":
        failing.boot_error = "ImportError: no module named 'x'"
        exit_worker(master, failing, code=3)
    else:
        master.clock.advance(31)
        master.tick()
    st = master.status()
    assert st["reload"]["state"] == "failed"
    assert st["reload"]["failed_worker"]["slot"] == 5
    assert ("no module named" if how == "exits" else "boot_timeout") in st["reload"]["error"]
    assert master.router.kernel == routes_before
    assert master.slot_count == 4 and master.cfg is cfg_before and master.generation == 1
    assert holders(master) == {w.slot: w.pid for w in old}
    assert all(w.state is A for w in old)
    survivors = [w for w in new if w is not failing]
    assert all(w.state is K and signal.SIGKILL in w.process.signals for w in survivors)
    # The next reload gets a new number: 3, never 2 again.
    for w in new:
        if w.pid in {r.pid for r in master.registry}:
            exit_worker(master, w, code=-9)
    sig(master, signal.SIGHUP)
    master.tick()
    assert {w.generation for w in booting(master)} == {3}


def test_reload_commits_in_one_rule_write_then_retires_the_old(tmp_path):
    master = make_master(tmp_path, workers=4)
    start(master)
    old = of_generation(master, 1)
    writes_before = len(master.router.applied)
    sig(master, signal.SIGHUP)
    for _ in range(5):                                 # all but slot 3's become ready
        master.tick()
        say_ready(master, [w for w in booting(master) if w.slot != 3])
    new = of_generation(master, 2)
    assert len(new) == 4
    assert len(master.router.applied) == writes_before
    say_ready(master, new[3:])
    master.tick()
    assert len(master.router.applied) == writes_before + 1
    assert master.router.kernel == {w.slot: w.port for w in new}
    assert all(w.state is A for w in new) and all(w.state is R for w in old)


def test_a_failed_rule_write_keeps_the_old_generation_and_is_retried(tmp_path):
    master = make_master(tmp_path, workers=2)
    start(master)
    old = of_generation(master, 1)
    routes_before = dict(master.router.kernel)
    sig(master, signal.SIGHUP)
    for _ in range(3):
        master.tick()
    master.router.failures_left = 2
    say_ready(master, of_generation(master, 2))
    master.tick()
    assert master.router.kernel == routes_before
    assert all(w.state is A for w in old)               # still serving: nothing was retired
    assert "xtables lock" in master.status()["route_error"]
    for _ in range(3):
        master.clock.advance(5)
        master.tick()
    new = of_generation(master, 2)
    assert master.router.kernel == {w.slot: w.port for w in new}
    assert all(w.state is R for w in old) and master.status()["route_error"] is None


# ---------------------------------------------------------------- back-off

def test_workers_that_keep_dying_young_back_off_exponentially(tmp_path):
    master = make_master(tmp_path, workers=2, timeout=0)    # fakes send no heartbeats
    start(master)
    spawned = len(master.spawner.specs)
    victim_slot = 1
    for _ in range(60):                  # one simulated minute, a tick a second
        for w in list(master.registry):
            if w.slot == victim_slot and w.state is not R:
                exit_worker(master, w, code=1)    # the code on disk no longer imports
        master.clock.advance(1.0)
        master.tick()
    respawns = len(master.spawner.specs) - spawned
    # Without back-off: 60. With 1, 2, 4, 8, 16, 30 s: about 6.
    assert 4 <= respawns <= 8, respawns
    assert master.slots[victim_slot].failures >= 5
    assert master.slots[0].holder.state is A          # the other slot is untouched


def test_replacements_of_young_workers_back_off_too(tmp_path):
    master = make_master(tmp_path, workers=1, max_requests=10, timeout=0)
    start(master)
    replacements = 0
    for _ in range(60):
        (holder,) = [w for w in master.registry if w.state is A]
        link.on_messages(master, holder.conn, [heartbeat(requests=1000)])   # over max_requests
        master.tick()
        for w in booting(master):
            replacements += 1
            say_ready(master, [w])
        master.tick()
        for w in list(master.registry):
            if w.state is R:
                exit_worker(master, w)
        master.clock.advance(1.0)
    assert 3 <= replacements <= 8, replacements


# ---------------------------------------------------------------- never dies

def test_an_exception_inside_a_handler_is_logged_and_the_master_goes_on(tmp_path, caplog):
    master = make_master(tmp_path, workers=2)
    master.begin()
    master.spawner.fail_with = RuntimeError("a bug in a dependency")
    with caplog.at_level(logging.ERROR):
        master.guard(master.tick)
        master.guard(master.tick)
    assert "unexpected error in tick" in caplog.text and "a bug in a dependency" in caplog.text
    assert caplog.text.count("unexpected error") == 1        # not once per tick
    master.spawner.fail_with = None
    master.guard(master.tick)
    assert len(booting(master)) == 2


def test_a_rule_backend_raising_anything_is_a_failed_write(tmp_path):
    master = make_master(tmp_path, workers=1)
    master.router.explode = TimeoutError("nft did not answer in 10s")
    master.begin()
    master.tick()
    assert "TimeoutError" in master.status()["route_error"]
    assert master.routes.installed is None


def test_spawn_failing_with_an_os_error_backs_the_slot_off(tmp_path):
    master = make_master(tmp_path, workers=1)
    master.begin()
    master.spawner.fail_with = OSError(24, "Too many open files")
    master.tick()
    assert master.slots[0].holder is None and master.slots[0].spawn_after > master.clock()


# ---------------------------------------------------------------- stopping

def test_stop_during_a_reload_never_reinstalls_routes(tmp_path):
    master = make_master(tmp_path, workers=2)
    start(master)
    sig(master, signal.SIGHUP)
    master.tick()
    sig(master, signal.SIGTERM)
    # Nothing new is routed; what the workers hold stays connected until they end.
    assert master.router.drained == 1 and master.router.removed == 0
    applied = len(master.router.applied)
    say_ready(master, [w for w in master.registry if w.state is WorkerState.BOOTING])
    for _ in range(5):
        master.tick()
    assert len(master.router.applied) == applied and master.router.removed == 0
    assert all(signal.SIGTERM in w.process.signals for w in master.registry)
    assert not booting(master) or all(w.generation == 2 for w in booting(master))
    spawned = len(master.spawner.specs)
    master.tick()
    assert len(master.spawner.specs) == spawned         # nothing new starts while stopping
    sig(master, signal.SIGHUP)
    assert master.deploy is None                        # and no reload begins
    for w in list(master.registry):
        exit_worker(master, w)
    master.tick()
    assert master.router.removed == 1 and master.finished()


def test_quick_stop_kills_what_is_left_at_the_deadline(tmp_path):
    master = make_master(tmp_path, workers=2)
    start(master)
    sig(master, signal.SIGINT)
    assert all(signal.SIGQUIT in w.process.signals for w in master.registry)
    master.clock.advance(3)
    master.tick()
    assert all(signal.SIGKILL in w.process.signals for w in master.registry)
    for w in list(master.registry):
        exit_worker(master, w, code=-9)
    master.tick()
    assert master.finished()


# ---------------------------------------------------------------- adoption

def recorded_from(master) -> state.Recorded:
    records = []
    master.write_state = lambda path, data: records.append(data)
    master.flush_state(force=True)
    return state.parse(records[-1])


def test_adoption_believes_only_recorded_workers_and_late_ones_never_outrank(tmp_path):
    spawner = FakeSpawner()
    old_master = make_master(tmp_path, workers=2, spawner=spawner)
    start(old_master)
    recorded = recorded_from(old_master)
    old_pids = {w.slot: w.pid for w in old_master.registry}

    new_master = make_master(tmp_path, workers=2, spawner=spawner)
    assert adoption.adopt(new_master, recorded)
    assert {w.pid for w in new_master.registry} == set(old_pids.values())
    assert all(w.adopted and w.state is A for w in new_master.registry)
    # Keep the kernel's routes to the adopted workers until a fresh generation takes over.
    new_master.routes.step()
    new_master.routes.collect()
    assert new_master.router.kernel == {w.slot: w.port for w in new_master.registry}
    # A stranger cannot join the adoption.
    stranger = Peer(new_master, pid=31337)
    stranger.say({"type": "hello", "name": new_master.name, "pid": 31337, "slot": 0,
                  "generation": 1, "phase": "active", "connections": 0, "requests": 0})
    assert stranger.closed
    # Only slot 0's worker reconnects in time; the window ends: a fresh generation.
    late = next(w for w in new_master.registry if w.slot == 1)
    Peer(new_master, old_pids[0]).say(hello(next(w for w in new_master.registry if w.slot == 0),
                                            phase="active"))
    new_master.clock.advance(2)
    new_master.tick()
    fresh = booting(new_master)
    assert {w.generation for w in fresh} == {2} and len(fresh) == 2
    say_ready(new_master, fresh)
    new_master.tick()
    assert holders(new_master) == {w.slot: w.pid for w in fresh}
    assert late.state is R                     # retired without ever reconnecting
    # Reconnecting now, it learns it is retiring; it does not take its slot back.
    peer = Peer(new_master, late.pid)
    peer.say(hello(late, phase="active"))
    assert peer.heard() == [{"type": "retire"}]
    assert holders(new_master) == {w.slot: w.pid for w in fresh}
    assert new_master.router.kernel == {w.slot: w.port for w in fresh}


def test_adoption_ends_workers_that_never_held_their_slot(tmp_path):
    spawner = FakeSpawner()
    old_master = make_master(tmp_path, workers=2, spawner=spawner)
    start(old_master)
    sig(old_master, signal.SIGHUP)
    old_master.tick()
    half_born = booting(old_master)
    assert half_born
    recorded = recorded_from(old_master)
    new_master = make_master(tmp_path, workers=2, spawner=spawner)
    adoption.adopt(new_master, recorded)
    assert all(signal.SIGKILL in w.process.signals for w in half_born)
    assert not {w.pid for w in half_born} & {w.pid for w in new_master.registry}


def test_holder_dying_during_its_replacement_waits_for_the_successor(tmp_path):
    master = make_master(tmp_path, workers=1, max_requests=10, timeout=0)
    start(master)
    (old,) = master.registry
    master.clock.advance(10)                       # not young: no back-off in the way
    link.on_messages(master, old.conn, [heartbeat(requests=1000)])
    master.tick()                                  # decides on the replacement
    master.tick()                                  # spawns it
    (successor,) = booting(master)
    old_sockets = master.slots[0].listeners
    exit_worker(master, old, code=-9)              # dies while its successor boots
    master.tick()
    assert booting(master) == [successor]          # no second worker for the slot
    say_ready(master, [successor])
    master.tick()
    assert holders(master) == {0: successor.pid}
    assert master.router.kernel == {0: successor.port}
    assert old_sockets not in master.unrouted      # our copy closed once unrouted


# ---------------------------------------------------------------- what /metrics and the dashboard read

def test_status_counts_reloads_exits_and_requests_across_generations(tmp_path):
    master = make_master(tmp_path, workers=2, timeout=0)
    peers = start(master)
    old = of_generation(master, 1)
    durations = [0] * 17
    durations[2] = 30
    for w in old:
        peers[w.pid].say(heartbeat(requests=30, responses=[0, 28, 0, 2, 0], durations=durations,
                                   duration_sum=0.12))
    sig(master, signal.SIGHUP)
    for _ in range(5):
        master.tick()
        say_ready(master, booting(master))
    master.tick()
    assert all(w.state is R for w in old)
    exit_worker(master, old[0], code=0)                # drained: retired
    exit_worker(master, of_generation(master, 2)[1], code=-9)   # an active worker killed: crashed
    st = master.status()
    counters = st["counters"]
    assert counters["requests"] == 60                  # the exited worker's 30 still count
    assert counters["responses"]["2xx"] == 56 and counters["responses"]["4xx"] == 4
    assert counters["duration"]["count"] == 60 and counters["duration"]["counts"][2] == 60
    assert counters["worker_exits"]["retired"] == 1 and counters["worker_exits"]["crashed"] == 1
    assert counters["reloads"] == {"ok": 1, "failed": 0}
    assert [(r["generation"], r["state"]) for r in st["reloads"]] == [(2, "done")]
    assert st["memory"]["cluster_limit"] is None
    assert all(w["connections_at_retire"] is not None for w in st["workers"] if w["state"] == "retiring")


def test_a_refused_reload_and_a_failed_one_are_in_the_history(tmp_path, monkeypatch):
    master = make_master(tmp_path, workers=2, timeout=0)
    start(master)
    sig(master, signal.SIGHUP)
    master.tick()
    failing = booting(master)[0]
    failing.boot_error = "ImportError: nope"
    exit_worker(master, failing, code=3)
    st = master.status()
    assert st["reloads"][-1]["state"] == "failed" and st["reloads"][-1]["failed_pid"] == failing.pid
    assert st["counters"]["reloads"] == {"ok": 0, "failed": 1}
    assert st["counters"]["worker_exits"]["crashed"] == 1


def test_series_keeps_a_few_minutes_of_samples_per_worker(tmp_path):
    master = make_master(tmp_path, workers=1, timeout=0)
    start(master)
    for _ in range(200):
        master.clock.advance(2.0)
        master.measure(master.clock())
    series = master.series()
    (samples,) = series["workers"].values()
    assert len(samples["rss"]) == len(samples["lag_ms"]) == 90 and series["interval_s"] == 2.0


def test_a_workers_last_words_are_read_even_when_its_exit_is_handled_first(tmp_path):
    master = make_master(tmp_path, workers=1, timeout=0)
    peers = start(master)
    (worker,) = of_generation(master, 1)
    peer = peers[worker.pid]
    peer.theirs.sendall(json.dumps(heartbeat(requests=77)).encode() + b"\n")
    peer.theirs.close()                      # it exited right after its last heartbeat
    exit_worker(master, worker, code=0)
    assert master.status()["counters"]["requests"] == 77


def leak_report(**overrides) -> dict:
    return {"type": "leak-report", "mode": "types", "lifetime_s": 40.0, "requests": 2000,
            "growth": [{"what": "leaky.LeakyThing", "count": 2000, "size": 112000}], **overrides}


def test_one_leak_report_per_retiring_worker_is_kept_and_logged(tmp_path, caplog):
    master = make_master(tmp_path, workers=1, timeout=0)
    peers = start(master)
    (old,) = of_generation(master, 1)
    peers[old.pid].say(leak_report())                 # active: not a real report
    assert master.status()["leak_reports"] == []
    sig(master, signal.SIGHUP)
    for _ in range(5):
        master.tick()
        say_ready(master, booting(master))
    master.tick()
    assert old.state is R
    with caplog.at_level(logging.WARNING):
        peers[old.pid].say(leak_report(), leak_report(growth=[]))
    (report,) = master.status()["leak_reports"]
    assert (report["pid"], report["slot"], report["generation"]) == (old.pid, 0, 1)
    assert report["significant"] and report["growth"][0]["what"] == "leaky.LeakyThing"
    assert sum("leaky.LeakyThing" in r.getMessage() for r in caplog.records) == 1
    assert any("its second" in r.getMessage() for r in caplog.records)
