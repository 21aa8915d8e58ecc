"""ipserve: a pre-fork gevent server that pins each client to one worker by its IP."""

__version__ = "0.1.0"
