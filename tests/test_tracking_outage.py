"""A real `mlflow server` stopped for 30 s while a RunLogger logs steps, then started again:
every step lands exactly once and nothing raises; an outage past the limit fails clearly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from mlflow import MlflowClient

from jobs.tracking import LOSS_KEYS, MlflowOutage, RunLogger

OUTAGE_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1:port over a sqlite file; stop() and start() keep the data."""

    def __init__(self, root, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 600.0) -> None:  # minutes on 2 cores shared by a busy team
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not start in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker, started by us
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, _free_port())
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _log_steps(logger: RunLogger, steps, flush_every: int = 5) -> None:
    for step in steps:
        logger.on_step(step, {k: 0.01 * step for k in LOSS_KEYS}, lr=1e-5)
        if step % flush_every == 0:  # as at a checkpoint report
            logger.flush()


def test_outage_of_30_s_loses_and_duplicates_nothing(server, monkeypatch):
    client = MlflowClient(server.uri)
    exp = client.create_experiment("outage")
    run_id = client.create_run(exp).info.run_id
    short_run = client.create_run(exp).info.run_id
    # MLflow's own HTTP retries (about 4 minutes by default) would hide the outage from RunLogger;
    # with them off, riding it out is RunLogger's doing.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    logger = RunLogger(server.uri, run_id, outage_s=900)  # the restart itself takes minutes under load
    impatient = RunLogger(server.uri, short_run, outage_s=3)
    _log_steps(logger, range(1, 11))

    server.stop()
    errors, t_flush = [], []

    def during_outage():
        t0 = time.monotonic()
        try:
            _log_steps(logger, range(11, 21))  # the flush at step 15 waits for the server
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        t_flush.append(time.monotonic() - t0)

    worker = threading.Thread(target=during_outage)
    t_down = time.monotonic()
    worker.start()
    impatient.on_step(1, {"total": 1.0}, lr=1e-5)
    with pytest.raises(MlflowOutage, match="more than 3 s"):  # a limit shorter than the outage: a clear failure
        impatient.flush()
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))
    server.start()
    worker.join(900)
    assert not worker.is_alive() and errors == []
    assert t_flush[0] >= OUTAGE_S - 5  # the flush really waited through the outage
    assert logger.client.retries > 0
    _log_steps(logger, range(21, 26))

    for key in [f"loss/{k}" for k in LOSS_KEYS] + ["lr"]:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, 26)), key
    assert client.get_metric_history(short_run, "loss/total") == []
