from dataclasses import dataclass

from ipserve.master import policy


@dataclass
class W:
    slot: int
    generation: int
    state: str = "active"
    port: int | None = None


def test_routes_prefer_newest_active_generation():
    workers = [W(0, 1, port=100), W(0, 2, port=200), W(1, 1, port=101), W(1, 2, "booting", None)]
    assert policy.routable_ports(workers, 2) == {0: 200, 1: 101}


def test_retiring_and_booting_workers_get_no_new_connections():
    workers = [W(0, 1, "retiring", 100), W(1, 1, port=101)]
    assert policy.desired_routes(workers, 2) == {0: 101, 1: 101}


def test_slots_to_spawn():
    workers = [W(0, 1), W(1, 1, "booting"), W(2, 0), W(3, 1, "retiring")]
    assert policy.slots_to_spawn(workers, 4) == [3]


def test_respawn_backoff():
    assert [policy.respawn_delay(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]


@dataclass
class R:
    slot: int
    generation: int
    state: str = "active"
    retired_at: float | None = None


def test_superseded_by_newer_active_worker_only():
    old, new_booting = R(0, 1), R(0, 2, "booting")
    assert policy.superseded([old, new_booting], 2) == []
    new_active = R(0, 2)
    assert policy.superseded([old, new_active, R(1, 1)], 2) == [old]


def test_superseded_when_slot_count_shrinks():
    workers = [R(0, 1), R(1, 1), R(2, 1), R(3, 1)]
    assert policy.superseded(workers, 2) == workers[2:]


def test_adopted_generations_raise_the_next_number():
    assert policy.next_generation(1, [R(0, 7), R(1, 3)]) == 8
    assert policy.next_generation(4, []) == 5


def test_overdue_retirees():
    workers = [R(0, 1, "retiring", 10.0), R(1, 1, "retiring", 95.0), R(2, 2)]
    assert policy.overdue_retirees(workers, 100.0, None) == []
    assert policy.overdue_retirees(workers, 100.0, 60.0) == [workers[0]]
