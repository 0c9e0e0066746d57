"""Helpers the Ray tests share: free ports, a local Ray start that survives a busy machine, and
ending one test's own Ray session (never `ray stop`, which would end every cluster on the box)."""
from __future__ import annotations

import os
import signal
import subprocess

from serve.local_mlflow import free_port  # noqa: F401 - re-exported for the tests


def kill_matching(pattern: str) -> None:
    """End the processes whose command line names `pattern` (a test's own Ray session folder)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    for pid in map(int, out):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def init_ray(attempts: int = 3, **kwargs) -> None:
    """`ray.init` of a 2-CPU local cluster, tried again: on the shared 2-core box a raylet can miss
    Ray's fixed 30 s start window."""
    import ray

    # address "local": a new cluster even where a stale /tmp/ray/ray_current_cluster names a dead one
    options = dict(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    options.update(kwargs)
    if ray.is_initialized():  # a module before this one that failed in its set-up
        ray.shutdown()
    for attempt in range(attempts):
        try:
            ray.init(**options)
            return
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt == attempts - 1:
                raise


def start_serve(attempts: int = 3, **ray_kwargs) -> int:
    """`init_ray` and Serve's HTTP proxy on a free port; its port. Serve waits a fixed 60 s for the proxy
    actor, which a loaded 2-core box can miss (its worker process is slow to start): the cluster is
    started again, up to `attempts` times."""
    import ray
    from ray import serve

    for attempt in range(attempts):
        init_ray(**ray_kwargs)
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except Exception:  # noqa: BLE001
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def stop_local(temp_dir: str | None, storage) -> None:
    """End what cluster/start_local.sh started for one test: its Ray session (by `temp_dir`) and its
    MLflow server (by the pid file in `storage`)."""
    from pathlib import Path

    if temp_dir:
        kill_matching(temp_dir)
    pid_file = Path(storage) / "run" / "mlflow.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
