"""Ray path of jobs/train_many.py: parallel efficiency and overhead, measured in one run.

1. direct: `SubjectTrainer.run()` + publish for one subject, no Ray (priors already cached), run
   twice in one process: the first pays torch's first-use costs, the second is the warm figure a
   slot's later subjects compare with;
2. one:    train_many with that one subject (cluster already up, priors cached), twice: the first
   job also creates the MLflow store (once per storage), the second is the figure used below;
3. many:   train_many with K subjects on a cluster with K trainer slots;
4. queue:  train_many with Q subjects on one trainer slot (one run after another).

Prints parallel efficiency = one / many (target >= 0.9 on GPU clusters), the overhead of the Ray
path = one / direct (target <= 1.1x for a full-length run), and two fixed costs:
- a one-subject job: one - direct (driver checks, MLflow run, Train controller and worker
  start-up, imports, registration);
- per subject on a running slot: (queue - one) / (Q - 1) - warm direct (what each further subject
  adds beyond its own training: model load, MLflow run, publish and registration; the slot's
  process starts are paid once). Target <= 15 s on the 2-core CPU machine;
- per subject of a slot of Q subjects, its start shared: queue / Q - warm direct.
A short run is dominated by those costs, so pass --steps to see the ratio shrink.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as cluster/runtime_env.yaml sets for the demo


def _subjects_yaml(k: int) -> str:
    from jobs.demo_subjects import DEMO_SUBJECTS

    ids = list(DEMO_SUBJECTS)
    return "[" + ", ".join(f"{{id: s{i}, class_noun: ball, images: [{ids[i % 2]}/00.png]}}" for i in range(k)) + "]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2, help="subjects trained at once (and trainer slots)")
    ap.add_argument("--queue-k", type=int, default=3, help="subjects trained one after another on one slot (>= 2)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per subject")
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "demo.yaml"))
    ap.add_argument("--model", default="tiny", help="base model and judges (the demo's own is `toy`)")
    ap.add_argument("--cpus-per-trainer", type=float, default=1.0, help="CPU slots per trainer without GPUs")
    args = ap.parse_args(argv)
    if args.queue_k < 2:
        ap.error("--queue-k must be at least 2 (it compares Q subjects on one slot with one)")

    import ray

    from comfusion.config import load_config
    from comfusion.data import check_subject
    from comfusion.priors import ensure_priors, read_priors
    from comfusion.train import SubjectTrainer
    from jobs import train_many
    from jobs.demo_subjects import write_demo_subjects

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-many-"))
    write_demo_subjects(tmp / "subjects")
    base = ["--set", f"data.root={tmp / 'subjects'}", "--set", f"job.storage={tmp / 'storage'}",
            "--set", f"model.base={args.model}", "--set", f"model.dino={args.model}", "--set", f"model.clip={args.model}",
            "--set", "train.num_instance_images=1",
            "--set", f"train.steps={args.steps}", "--set", "train.validate_every=0",
            "--set", f"train.checkpoint_every={max(1, args.steps // 3)}", "--set", "job.methods=[comfusion]",
            "--set", f"job.cpus_per_trainer={args.cpus_per_trainer}"]
    cfg = load_config(args.config, [b for b in base if b != "--set"] + [f"data.subjects={_subjects_yaml(1)}"])
    subject = check_subject(cfg.data.subjects[0], cfg.data, cfg.model.resolution)
    priors = read_priors(ensure_priors(subject.class_noun, cfg, cfg.job.storage, progress=None).folder)

    directs = []
    for i in range(2):
        t0 = time.perf_counter()
        trainer = SubjectTrainer(cfg, subject, priors, device="cpu")
        trainer.run()
        trainer.publish(tmp / f"direct{i}")
        directs.append(time.perf_counter() - t0)
    direct, warm = directs

    ray.init(address="local", num_cpus=max(2, int(args.k * args.cpus_per_trainer) + 1), include_dashboard=False,
             log_to_driver=False)
    timings = {}
    for label, k, slots in (("first", 1, 1), ("one", 1, 1), ("many", args.k, args.k), ("queue", args.queue_k, 1)):
        print(f"[train_many bench] {label}: {k} subject(s) on {slots} slot(s)", flush=True)
        t0 = time.perf_counter()
        code = train_many.main(["--config", args.config, *base, "--set", f"data.subjects={_subjects_yaml(k)}",
                                "--set", f"job.name=bench-{label}", "--set", f"job.max_concurrent={slots}"])
        timings[label] = time.perf_counter() - t0
        if code != 0:
            print(f"train_many failed for {label}", file=sys.stderr)
            return 1
    ray.shutdown()
    print(f"\nmachine: {os.cpu_count()} CPUs, no GPU" if not _has_cuda() else "\nmachine: CUDA")
    print(f"steps={args.steps} k={args.k} cpus_per_trainer={args.cpus_per_trainer}")
    print(f"direct trainer, 1 subject:   {direct:8.1f} s   (again in the same process: {warm:.1f} s)")
    print(f"train_many, 1 subject:       {timings['one']:8.1f} s   overhead {timings['one'] / direct:.2f}x   "
          f"(the first job, creating the MLflow store: {timings['first']:.1f} s)")
    print(f"fixed cost, 1-subject job:   {timings['one'] - direct:8.1f} s   (train_many 1 subject - direct)")
    print(f"train_many, {args.k} subjects:      {timings['many']:8.1f} s   "
          f"parallel efficiency {timings['one'] / timings['many']:.2f}")
    per = (timings["queue"] - timings["one"]) / (args.queue_k - 1) - warm
    print(f"train_many, {args.queue_k} subjects, 1 slot: {timings['queue']:6.1f} s")
    print(f"fixed cost per subject:      {per:8.1f} s   ((1 slot - 1 subject) / {args.queue_k - 1} - warm direct; "
          f"{(per + warm) / warm:.2f}x warm direct)")
    shared = timings["queue"] / args.queue_k - warm
    print(f"fixed cost per subject, slot start shared by {args.queue_k}: {shared:5.1f} s   "
          f"(1 slot / {args.queue_k} - warm direct)")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
