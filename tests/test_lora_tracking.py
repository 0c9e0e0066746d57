"""The registry records a subject version's kind (tag `kind`), and the reading side reports it;
`checkpoint_sizes` gives the figures the training job logs. Real MLflow (sqlite in tmp), no Ray."""
from __future__ import annotations

from comfusion.checkpoint import checkpoint_sizes
from comfusion.registry import TAG_KIND, version_kind, version_tags
from test_lora_slot import _full, _lora


def test_kind_tag_and_sizes(tmp_path):
    from mlflow import MlflowClient

    from jobs.tracking import register_checkpoint
    from serve.registry import SubjectRegistry

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("kinds", artifact_location=str(tmp_path / "artifacts"))
    folders = {"full-1": _full(tmp_path / "full", 1), "lora-2": _lora(tmp_path / "lora", 2)}
    for sid, folder in folders.items():
        run = client.create_run(exp)
        version = register_checkpoint(client, run.info.run_id, folder, sid, "comfusion")
        tags = client.get_model_version(sid, str(version)).tags
        assert tags[TAG_KIND] == sid.split("-")[0]
    reader = SubjectRegistry(uri, tmp_path / "cache")
    assert {r.id: r.kind for r in reader.list_subjects()} == {"full-1": "full", "lora-2": "lora"}
    assert reader.resolve("lora-2").public()["kind"] == "lora"

    full, lora = checkpoint_sizes(folders["full-1"]), checkpoint_sizes(folders["lora-2"])
    assert lora["checkpoint/bytes"] < 0.2 * full["checkpoint/bytes"] and lora["checkpoint/params"] > 0
    assert version_kind({}) == "full" and version_tags("a", "sks", "dog", "comfusion", None)[TAG_KIND] == "full"
