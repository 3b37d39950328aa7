"""Where the stages run: the Ray cluster they share."""

import os

import ray


def ensure_ray() -> None:
    """Join RAY_ADDRESS if it is set (a cluster), else start Ray on this machine with its
    dashboard listening on localhost only. Does nothing if Ray is already initialised."""
    if ray.is_initialized():
        return
    # Workers log warnings and errors only: Ray Data and Ray Train narrate every dataset and report at INFO.
    quiet = ray.LoggingConfig(encoding="TEXT", log_level="WARNING")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_config=quiet)
    else:
        ray.init(dashboard_host="127.0.0.1", logging_config=quiet)
