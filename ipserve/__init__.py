"""ipserve: a pre-fork gevent server that pins each client to one worker by its IP."""

# The one place the version is written: pyproject.toml reads it from here
# (dynamic = ["version"]), so a source tree without metadata knows it too.
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


def version() -> str:
    """The version `--version` prints: the installed distribution's, or, for an
    editable install or a source tree, __version__ (the code that runs is the
    tree's; an editable install's metadata is as old as its last install)."""
    from importlib import metadata  # not imported by workers unless asked

    try:
        dist = metadata.distribution("ipserve")
    except metadata.PackageNotFoundError:
        return __version__
    return __version__ if is_editable(dist.read_text("direct_url.json")) else dist.version


def is_editable(direct_url_json: str | None) -> bool:
    """Whether PEP 610's direct_url.json (None if absent) records `pip install -e`."""
    import json

    try:
        return bool(json.loads(direct_url_json or "{}").get("dir_info", {}).get("editable"))
    except (ValueError, AttributeError):
        return False
