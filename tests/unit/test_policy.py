"""The master's pure decisions (ipserve.master.policy)."""

from dataclasses import dataclass

import pytest

from ipserve.master import policy
from ipserve.master.registry import ExitReason, WorkerState

A, B, R, K, H = (WorkerState.ACTIVE, WorkerState.BOOTING, WorkerState.RETIRING,
                 WorkerState.KILLED, WorkerState.HUNG)
READY = WorkerState.READY


@dataclass(eq=False)
class W:
    slot: int
    generation: int = 1
    state: WorkerState = A
    pid: int = 0
    serial: int = 0
    spawned_at: float = 0.0
    activated_at: float | None = 0.0
    retired_at: float | None = None
    last_seen: float = 0.0
    rss: int = 0
    connections: int = 0
    replacing: str | None = None
    max_requests: int = 0
    requests: int = 0
    busy_since: float | None = None
    replace_cause: ExitReason | None = None
    boot_error: str | None = None


# ---------------------------------------------------------------- back-off and pacing

def test_backoff_doubles_from_base_to_cap():
    assert [policy.backoff_delay(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    assert [policy.backoff_delay(n, base=0.25, cap=2) for n in range(6)] == [0, .25, .5, 1, 2, 2]
    assert policy.backoff_delay(10_000) == 30   # no overflow after a long outage


def test_at_most_one_boot_per_core_but_never_fewer_than_two():
    assert policy.max_booting(1) == 2
    assert policy.max_booting(2) == 2
    assert policy.max_booting(16) == 16


def test_died_young_counts_from_activation():
    assert policy.died_young(W(0, activated_at=None), now=100.0)      # never served
    assert policy.died_young(W(0, activated_at=98.0), now=100.0)
    assert not policy.died_young(W(0, activated_at=90.0), now=100.0)


def test_generation_numbers_rise_above_every_worker_seen():
    assert policy.next_generation(1, [W(0, 7), W(1, 3)]) == 8
    assert policy.next_generation(4, []) == 5


# ---------------------------------------------------------------- settling routes

def test_nothing_settles_until_the_kernel_routes_something():
    holder = W(0, 2, READY)
    assert policy.settle([holder], [200], None, [holder]) == ([], [])


def test_routed_ready_holder_is_activated_and_the_old_worker_retired():
    old, new = W(0, 1, A, pid=1), W(0, 2, READY, pid=2)
    other = W(1, 1, A, pid=3)
    activate, retire = policy.settle([new, other], [200, 101], {0: 200, 1: 101}, [old, new, other])
    assert activate == [new]
    assert retire == [old]


def test_nothing_moves_while_the_kernel_still_routes_the_old_port():
    old, new = W(0, 1, A, pid=1), W(0, 2, READY, pid=2)
    assert policy.settle([new], [200], {0: 100}, [old, new]) == ([], [])


def test_reuseport_shares_the_port_so_the_holder_decides():
    # Same port for both generations: routing is who accepts, i.e. the holder.
    old, new = W(0, 1, A, pid=1), W(0, 2, READY, pid=2)
    activate, retire = policy.settle([new], [8000], {0: 8000}, [old, new])
    assert activate == [new] and retire == [old]
    # Before the commit the old worker is still the holder: nothing changes.
    assert policy.settle([old], [8000], {0: 8000}, [old, new]) == ([], [])


def test_workers_beyond_a_shrunk_slot_count_retire_once_the_small_table_is_in():
    w0, w1, w2, w3 = (W(s, 2, A, pid=s) for s in range(4))
    workers = [w0, w1, w2, w3]
    assert policy.settle([w0, w1], [100, 101], {0: 100, 1: 101, 2: 102, 3: 103}, workers)[1] == []
    assert policy.settle([w0, w1], [100, 101], {0: 100, 1: 101}, workers)[1] == [w2, w3]


def test_strays_are_booting_or_ready_workers_nobody_expects():
    keep, stray, ready_stray, active = W(0, pid=1, state=B), W(1, pid=2, state=B), \
        W(2, pid=3, state=READY), W(3, pid=4)
    assert policy.strays([keep, stray, ready_stray, active], {1}) == [stray, ready_stray]


# ---------------------------------------------------------------- health

def test_overdue_boots_and_zero_means_no_limit():
    slow, fresh = W(0, state=B, spawned_at=0.0), W(1, state=B, spawned_at=95.0)
    assert policy.overdue_boots([slow, fresh, W(2)], 100.0, 30.0) == [slow]
    assert policy.overdue_boots([slow], 100.0, None) == []


def test_hung_and_zero_timeout_disables():
    silent, chatty = W(0, last_seen=10.0), W(1, last_seen=95.0)
    booting = W(2, state=B, last_seen=0.0)       # boot_timeout's business, not timeout's
    assert policy.hung([silent, chatty, booting], 100.0, 30.0) == [silent]
    assert policy.hung([silent], 100.0, None) == []
    assert policy.hung([silent], 100.0, 0) == []


def test_overdue_retirees():
    workers = [W(0, state=R, retired_at=10.0), W(1, state=R, retired_at=95.0), W(2)]
    assert policy.overdue_retirees(workers, 100.0, None) == []
    assert policy.overdue_retirees(workers, 100.0, 60.0) == [workers[0]]


def test_health_replacements():
    fat = W(0, rss=600 << 20)
    tired = W(1, max_requests=10, requests=10)
    busy = W(2, busy_since=40.0)
    already = W(3, rss=600 << 20, replacing="memory")
    retiring = W(4, state=R, rss=600 << 20)
    out = policy.health_replacements([fat, tired, busy, already, retiring], 100.0,
                                     worker_memory=500 << 20, max_requests=True,
                                     busy_retire_after=45.0)
    assert [(r.worker, r.cause, r.rate_limited) for r in out] == [
        (fat, ExitReason.MEMORY, True), (tired, ExitReason.MAX_REQUESTS, False),
        (busy, ExitReason.BUSY, True)]
    assert "RSS 600 MiB" in out[0].reason and "max_requests" in out[1].reason
    assert "busy" in out[2].reason
    # 0 (None) disables each check.
    assert policy.health_replacements([busy], 100.0, worker_memory=None, max_requests=False,
                                      busy_retire_after=None) == []


def test_cluster_memory_under_80_percent_does_nothing():
    assert policy.cluster_memory_actions([W(0, rss=70), W(1, state=R, rss=9)], 100) == []


def test_cluster_memory_asks_retiring_in_order():
    a = W(0, state=R, rss=30, connections=5)
    b = W(1, state=R, rss=20, connections=0)
    c = W(2, state=R, rss=25, connections=0)
    actions = policy.cluster_memory_actions([a, b, c, W(3, rss=10)], 100)
    assert actions == [("close", c)]          # fewest connections, then largest


def test_cluster_memory_above_95_percent_kills():
    a, b = W(0, state=R, rss=60), W(1, rss=40)
    assert policy.cluster_memory_actions([a, b], 100) == [("kill", a)]


def test_cluster_memory_exceeded_without_retiring_replaces_largest_active():
    small, large = W(0, rss=40), W(1, rss=70)
    assert policy.cluster_memory_actions([small, large], 100) == [("replace", large)]


@pytest.mark.parametrize("limit", [None, 0])
def test_cluster_memory_without_limit(limit):
    assert policy.cluster_memory_actions([W(0, rss=1 << 40)], limit) == []


# ---------------------------------------------------------------- exit reasons

@pytest.mark.parametrize("worker, stopping, reason", [
    (W(0, state=R), False, ExitReason.RETIRED),                 # superseded, drained
    (W(0, state=A), True, ExitReason.RETIRED),                  # stopped with the master
    (W(0, state=K), False, ExitReason.RETIRED),                 # rolled back, healthy
    (W(0, state=K, boot_error="not ready within boot_timeout"), False, ExitReason.CRASHED),
    (W(0, state=B, boot_error="ImportError: x"), False, ExitReason.CRASHED),
    (W(0, state=A), False, ExitReason.CRASHED),                 # died on its own
    (W(0, state=READY), False, ExitReason.CRASHED),
    (W(0, state=H), False, ExitReason.HUNG),
    (W(0, state=H, replace_cause=ExitReason.MEMORY), False, ExitReason.HUNG),
    (W(0, state=R, replace_cause=ExitReason.MEMORY), False, ExitReason.MEMORY),
    (W(0, state=R, replace_cause=ExitReason.BUSY), False, ExitReason.BUSY),
    (W(0, state=R, replace_cause=ExitReason.MAX_REQUESTS), True, ExitReason.MAX_REQUESTS),
    (W(0, state=A, replace_cause=ExitReason.MEMORY), False, ExitReason.MEMORY),
])
def test_exit_reason(worker, stopping, reason):
    assert policy.exit_reason(worker, stopping) is reason
