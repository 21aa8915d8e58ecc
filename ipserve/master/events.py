"""What the master's selector can wake up for; each registration carries one."""

from __future__ import annotations

import enum


class Event(enum.Enum):
    SIGNAL = "signal"          # a signal handler wrote to the wake-up socket
    ACCEPT = "accept"          # a connection waits on the control socket
    CONNECTION = "connection"  # a control connection is readable (or writable)
    WORKER_EXIT = "exit"       # a worker's pidfd: it exited
    ROUTES = "routes"          # the route writer finished a write
    REFUSE = "refuse"          # a slot waiting past boot_timeout has connections to reset
