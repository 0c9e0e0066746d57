"""Per-term gradient norms reach MLflow as `grad_norm/<term>` through the trainer's callbacks."""
from mlflow.tracking import MlflowClient

from jobs.tracking import RunLogger


def test_run_logger_logs_grad_norms_per_step(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("norms", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    logger = RunLogger(uri, run_id)
    for step in (1, 2):
        logger.on_step(step, {"instance": 1.0, "total": 1.0}, 1e-4)
    logger.on_grad_norms(2, {"instance": 0.5, "fusion_scene": 0.25, "total": 0.6})
    logger.flush()
    history = client.get_metric_history(run_id, "grad_norm/fusion_scene")
    assert [(m.step, m.value) for m in history] == [(2, 0.25)]
    assert client.get_metric_history(run_id, "grad_norm/total")[0].value == 0.6
    again = RunLogger(uri, run_id)  # a resumed worker: steps already logged are not logged twice
    again.on_grad_norms(2, {"total": 9.0})
    again.flush()
    assert [m.value for m in client.get_metric_history(run_id, "grad_norm/total")] == [0.6]
