"""Rule writes off the master's loop (ipserve.master.routes)."""

from __future__ import annotations

import socket
import threading

from ipserve.master.routes import Routes, RouteWriter
from ipserve.routing import RouteError


class SlowRouter:
    """apply() blocks until released, like iptables-restore waiting for the xtables lock."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.applied = []
        self.fail = False

    def apply(self, table):
        self.started.set()
        self.release.wait(10)
        if self.fail:
            raise RouteError("locked")
        self.applied.append(table)

    def drain(self):
        self.applied.append("drain")

    def remove(self):
        self.applied.append(None)


def test_a_slow_write_does_not_block_and_the_newest_table_wins():
    router = SlowRouter()
    wake_r, wake_w = socket.socketpair()
    writer = RouteWriter(router, wake_w)
    try:
        writer.submit({0: 1})          # blocks in the thread, not here
        assert router.started.wait(10)
        writer.submit({0: 2})
        writer.submit({0: 3})          # replaces {0: 2}, which is never written
        assert not writer.idle
        router.release.set()
        wake_r.settimeout(10)
        assert wake_r.recv(1) == b"r"
        writer.close()
        assert router.applied == [{0: 1}, {0: 3}]
    finally:
        writer.close()
        wake_r.close()
        wake_w.close()


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_failures_keep_the_installed_table_and_back_off():
    router = SlowRouter()
    router.release.set()
    router.fail = True
    clock = Clock()
    routes = Routes(RouteWriter(router, threaded=False), clock)
    routes.want({0: 1})
    routes.step()
    routes.collect()
    assert routes.installed is None and routes.error == "locked"
    routes.step()
    assert not routes.in_flight          # not before the back-off delay
    clock.now = 0.3
    routes.step()
    routes.collect()
    assert routes.failures == 2
    router.fail = False
    clock.now = 10
    routes.step()
    routes.collect()
    assert routes.installed == {0: 1} and routes.error is None and routes.failures == 0


def test_once_draining_nothing_is_routed_again():
    router = SlowRouter()
    router.release.set()
    routes = Routes(RouteWriter(router, threaded=False), Clock())
    routes.want({0: 1})
    routes.step()
    routes.collect()
    routes.drain()
    routes.collect()
    assert routes.installed == {}
    routes.want({0: 2})
    routes.step()
    routes.collect()
    routes.remove()
    routes.collect()
    assert router.applied == [{0: 1}, "drain", None] and routes.installed is None
