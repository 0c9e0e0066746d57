"""Train many subjects with ComFusion (and baselines) on a Ray cluster, tracked in MLflow.

    ray job submit --working-dir . -- python jobs/train_many.py --config configs/<x>.yaml [--set k=v ...]

Checks the config and every subject, makes the class priors with Ray Data (once per class,
cached), then trains every (subject, method) on Ray Train: one trainer per training slot (as
many slots as the cluster has room for), each slot's worker taking the runs one after another from
a shared queue. Prints a summary; exits non-zero if any subject failed.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from comfusion.config import ConfigError, load_config, to_dict  # noqa: E402
from comfusion.data import format_subject_errors, validate_subjects  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="job config YAML (configs/demo.yaml, configs/paper.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=400 (repeatable)")
    ap.add_argument("--address", default=None, help="Ray address (default: the job's cluster, or a local one)")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="an MLflow tag set on every run of this job, reused runs included (repeatable)")
    args = ap.parse_args(argv)
    bad = [t for t in args.tag if "=" not in t or not t.split("=", 1)[0].strip()]
    if bad:
        ap.error(f"--tag {bad[0]!r}: must look like KEY=VALUE")
    return args


def parse_tags(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def check_subjects(cfg) -> tuple[list, dict[str, list[str]]]:
    """Every subject's photos (the project's checks), and enough photos for the training setting:
    (good subjects, problems by subject id), before any compute."""
    subjects, errors = validate_subjects(cfg.data.subjects, cfg.data, cfg.model.resolution, load_pixels=False)
    need = cfg.train.num_instance_images
    for s in [s for s in subjects if len(s.image_paths) < need]:
        errors[s.id] = [f"has {len(s.image_paths)} photo(s) but train.num_instance_images is {need}"]
        subjects.remove(s)
    return subjects, errors


def make_all_priors(cfg, subjects, storage: Path) -> dict:
    """Priors of every (class, method) the job needs, one Ray Data pipeline per scene list."""
    from jobs.priors import make_priors  # noqa: PLC0415

    folders: dict = {}
    by_scenes: dict[tuple, list] = {}
    for s in subjects:
        by_scenes.setdefault(tuple(s.scenes), []).append(s)
    for scenes, group in by_scenes.items():
        reports = make_priors(cfg, [s.class_noun for s in group], storage, methods=list(cfg.job.methods),
                              scenes=scenes)
        for (noun, method), rep in reports.items():
            folders[(scenes, noun, method)] = rep.folder
    return folders


# Config parts that do not change what a (subject, method) run trains: the job's operational
# settings, evaluation, and the manifest's other subjects, its folder and path rules.
_NOT_TRAINING = ("job", "eval")
_NOT_TRAINING_DATA = ("subjects", "root", "allow_absolute_paths", "scenes")


def run_key(cfg, subject) -> str:
    """What makes two (subject, method) trainings the same, so a resubmitted job finds its runs:
    everything that changes what trains (model, data checks, sampler, priors, losses, training,
    method), the subject's texts and scenes, and its photos by content. Adding a subject to the
    manifest, moving the storage or changing how the job runs keeps every key."""
    identity = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_TRAINING}
    identity["data"] = {k: v for k, v in identity["data"].items() if k not in _NOT_TRAINING_DATA}
    h = hashlib.sha256(yaml.safe_dump(identity, sort_keys=True).encode())
    h.update("|".join([subject.id, subject.identifier, subject.class_noun, *subject.scenes]).encode())
    for path in subject.image_paths:
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()[:16]


def plan_runs(cfg, subjects, priors: dict, storage: Path, use_gpu: bool,
              tags: dict[str, str] | None = None) -> tuple[list, list[dict]]:
    """One SubjectRun per (subject, method) still to train, and a summary row per one already done.

    A run with the same `run_key` in the job's experiment is reused: finished and registered, it is
    not trained again; unfinished (a driver or cluster that died), it resumes from its last Ray
    Train checkpoint and logs into the same MLflow run. `tags` are set on every run, reused or not.
    """
    from mlflow import MlflowClient  # noqa: PLC0415

    from comfusion.registry import tracking_uri  # noqa: PLC0415
    from jobs.tracking import create_run, experiment_id  # noqa: PLC0415
    from jobs.train_worker import SubjectRun  # noqa: PLC0415

    uri = tracking_uri(storage, cfg.job.tracking_uri)
    client = MlflowClient(uri)
    exp = experiment_id(client, cfg.job.name, storage)
    spec_of = {sp.id: sp for sp in cfg.data.subjects}
    runs, done = [], []
    for s in subjects:
        for method in cfg.job.methods:
            c = cfg.replace(method=method, **{"job.storage": str(storage)})
            key = run_key(c, s)
            earlier = _earlier_run(client, exp, key)
            for k, v in (tags or {}).items() if earlier is not None else ():
                client.set_tag(earlier.info.run_id, k, v)
            if earlier is not None and _finished(client, earlier):
                done.append(_reused_row(client, earlier, s.id, method))
                continue
            if earlier is not None:
                run_id = earlier.info.run_id
                client.update_run(run_id, status="RUNNING")
                print(f"{s.id} · {method}: resuming run {run_id} (same config and photos)", flush=True)
            else:
                run_id = create_run(client, exp, c, s.id, s.class_noun, s.identifier)
                scenes = ", ".join(s.scenes)[:5000]  # params hold the job's data.scenes
                for k, v in {RUN_KEY_TAG: key, SCENES_TAG: scenes, **(tags or {})}.items():
                    client.set_tag(run_id, k, v)
            runs.append(SubjectRun(cfg=c, spec=spec_of[s.id], run_id=run_id, tracking_uri=uri,
                                   priors_dir=priors[(tuple(s.scenes), s.class_noun, method)],
                                   checkpoint_dir=str(storage / "checkpoints" / cfg.job.name / s.id / method / run_id),
                                   resume_dir=str(storage / "resume" / cfg.job.name / run_id), use_gpu=use_gpu))
    print(f"mlflow: experiment '{cfg.job.name}' at {uri} ({len(runs)} to train, {len(done)} done before)",
          flush=True)
    return runs, done


RUN_KEY_TAG = "run_key"
SCENES_TAG = "scenes"  # the subject's scenes (its own, or the job's data.scenes)


def _earlier_run(client, exp: str, key: str):
    found = client.search_runs([exp], filter_string=f"tags.{RUN_KEY_TAG} = '{key}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def _finished(client, run) -> bool:
    return run.info.status == "FINISHED" and bool(client.search_model_versions(f"run_id = '{run.info.run_id}'"))


def _reused_row(client, run, subject_id: str, method: str) -> dict:
    version = client.search_model_versions(f"run_id = '{run.info.run_id}'")[0]
    step = run.data.metrics.get("final/step")
    return {"subject": subject_id, "method": method, "status": "reused", "run_id": run.info.run_id,
            "steps": int(step) if step is not None else None, "final_loss": run.data.metrics.get("loss/total"),
            "checkpoint": None, "version": int(version.version)}


def train_all(cfg, runs: list, storage: Path, use_gpu: bool) -> list[dict]:
    """Train every run: one Ray Train trainer per training slot, fitted in a driver thread each, whose
    worker takes runs from a shared `RunQueue` until none is left. A summary row per run."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    import ray  # noqa: PLC0415

    from jobs.resources import trainer_slots  # noqa: PLC0415
    from jobs.train_worker import RunQueue, end_run, fit_slot  # noqa: PLC0415

    slots = trainer_slots(cfg, use_gpu, len(runs))
    print(f"training {len(runs)} runs on {slots} trainer slot(s), one run after another on each", flush=True)
    queue = RunQueue.remote(len(runs), cfg.job.max_failures)
    name = f"{cfg.job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with ThreadPoolExecutor(slots, thread_name_prefix="slot") as pool:
        stops = [s for s in pool.map(lambda k: fit_slot(runs, queue, k, f"{name}-slot{k}",
                                                        str(storage / "ray_results")), range(slots)) if s]
    results = ray.get(queue.results.remote())
    rows = []
    for i, run in enumerate(runs):
        row = results.get(i) or {"status": "failed", "error": "not trained: every trainer slot stopped"
                                 + (f" ({stops[-1]})" if stops else "")}  # the queue was never emptied
        if row["status"] == "failed":  # ended by its worker, or given up after lost workers
            end_run(run, "FAILED")
        rows.append({"subject": run.spec.id, "method": run.cfg.method, "run_id": run.run_id, **row})
    return rows


# one format per column of the summary table
SUMMARY_FORMATS = {"subject": "{}", "method": "{}", "status": "{}", "steps": "{:d}", "wall_s": "{:.1f}",
                   "final_loss": "{:.4f}", "checkpoint": "{}", "run_id": "{}"}


def print_summary(rows: list[dict]) -> None:
    cols = tuple(SUMMARY_FORMATS)
    table = [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("\n" + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    for r in rows:
        if r.get("error"):
            print(f"{r['subject']} ({r.get('method', '-')}): {r['error']}")


def _fmt(col: str, v) -> str:
    if v is None:
        return "-"
    try:
        return SUMMARY_FORMATS[col].format(v)
    except (ValueError, TypeError):  # e.g. a NaN loss or a step count given as a float
        return str(v)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    subjects, errors = check_subjects(cfg)
    if errors:
        print(f"invalid subjects (skipped):\n{format_subject_errors(errors)}", file=sys.stderr)
    rows = [{"subject": sid, "method": "-", "status": "invalid", "error": "; ".join(p)} for sid, p in errors.items()]
    if subjects:
        import ray  # noqa: PLC0415

        storage = Path(cfg.job.storage).resolve()
        if not ray.is_initialized():
            # Inside `ray job submit` this joins the job's cluster (and its runtime env); alone it
            # starts a local one whose workers inherit this environment.
            ray.init(address=args.address, log_to_driver=True)
        from jobs.resources import NoRoomError, uses_gpu  # noqa: PLC0415

        try:
            use_gpu = uses_gpu(cfg)
            priors = make_all_priors(cfg, subjects, storage)
            runs, done = plan_runs(cfg, subjects, priors, storage, use_gpu, parse_tags(args.tag))
            rows = (train_all(cfg, runs, storage, use_gpu) if runs else []) + done + rows
        except (NoRoomError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print_summary(rows)
    return 0 if rows and all(r["status"] in ("ok", "reused") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
