"""ipserve: a pre-fork gevent server that pins each client to one worker by its IP."""

__version__ = "0.1.0"

_lag_meter = None   # set by the worker process

# In a worker, from before the application is imported: {"slot", "generation",
# "pid", "name"} (the same dict as environ["ipserve.worker"]); None elsewhere.
current_worker: dict | None = None


def too_busy() -> bool:
    """True while this worker's gevent hub lags more than `busy_lag`.

    Application code may use it to refuse optional work; outside an ipserve
    worker it is always False.
    """
    return _lag_meter is not None and _lag_meter.too_busy()
