"""A local `mlflow server` on a free port that can be stopped and started again.

Tests and `benchmarks/faults.py` use it to take the registry away from a running Serve app,
the way a real tracking server goes down. Artifacts go through the server (`mlflow-artifacts:`),
so an outage also takes away the checkpoints the app has not cached.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalMlflowServer:
    """`mlflow server` over `<root>/mlflow.db` and `<root>/artifacts`, on 127.0.0.1 and a free port."""

    def __init__(self, root: str | Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = self.root / "artifacts"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600.0) -> LocalMlflowServer:
        """Start the server (same port, same data as before) and wait until it answers."""
        if self.running():
            return self
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.artifacts)]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child keeps it open
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}; see {self.root / 'server.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mlflow server did not answer on {self.uri} within {timeout_s:.0f} s")
            time.sleep(0.25)
        return self

    def stop(self) -> None:
        """Stop the server and its workers (the whole process group it started)."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None
        deadline = time.monotonic() + 10
        while self._answers() and time.monotonic() < deadline:  # the port is free again
            time.sleep(0.1)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections and never answers, like a hung host."""
        os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self._proc.pid, signal.SIGCONT)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
