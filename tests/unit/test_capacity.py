"""Refusing a worker count the machine cannot hold (ipserve.master.capacity)."""

from ipserve.master import capacity
from ipserve.master.capacity import Facts

GiB, MiB = 1 << 30, 1 << 20
ROOMY = Facts(mem_available=23 * GiB, fd_hard_limit=20000, tasks_available=30000)


def test_a_count_that_fits_is_accepted():
    assert capacity.problem(512, 1, 31 * MiB, ROOMY) is None


def test_memory_says_the_numbers_and_the_largest_count_that_fits():
    why = capacity.problem(1024, 1, 31 * MiB, ROOMY)
    assert "1024 x 31 MiB = 31.0 GiB" in why and "23.0 GiB is available" in why
    assert why.endswith("use at most -w 512")


def test_open_files_of_the_master_during_a_reload():
    why = capacity.problem(1024, 2, 1 * MiB, Facts(64 * GiB, 4096, None))
    assert "8256 open files" in why and "hard limit is 4096" in why and "-w 256" in why


def test_tasks():
    why = capacity.problem(256, 1, 1 * MiB, Facts(None, None, 1000))
    assert "1536 processes and threads" in why and "use at most -w 128" in why


def test_unknown_facts_do_not_refuse():
    assert capacity.problem(1024, 2, None, Facts(None, None, None)) is None


def test_fit_is_a_power_of_two():
    assert [capacity.fit(n) for n in (0, 1, 2, 3, 700, 1024)] == [1, 1, 2, 2, 512, 1024]


def test_reading_this_machine_gives_numbers():
    facts = Facts.read()
    assert facts.mem_available is None or facts.mem_available > 0
    assert facts.tasks_available is None or facts.tasks_available >= 0
