"""`make demo`: the whole product on one CPU machine, on the committed `toy` model.

1. writes the demo subjects' photos (toy-world objects the model never saw; no photos ship),
2. starts a local Ray head and an MLflow server (cluster/start_local.sh),
3. submits jobs/train_many.py with `ray job submit` (priors on Ray Data, training on Ray Train),
4. deploys the Serve app (configs/serve.yaml, on the job's base model) and asks it for each demo
   subject in a few of the job's scenes: demo_out/<id>.png, and demo_out/demo.png (photo, then
   the app's pictures, enlarged),
then leaves Ray, MLflow and the app running. `make stop` (this script with --stop) stops them.
Running it again reuses the priors and adds new runs.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STORAGE = REPO / "storage"
BIN = Path(sys.executable).parent
MLFLOW_URI = "http://127.0.0.1:5000"
APP_URL = "http://127.0.0.1:8000"
KEYS_FILE = STORAGE / "api_keys.json"  # the app's key file (hashed keys); `python -m serve.auth --help`


def sh(*cmd: str, env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **(env or {})})


def cluster_env() -> dict:
    # `python` in the job's entrypoint and in Ray's workers must be this environment's; the local
    # head uses Ray's token authentication (its token in ~/.ray/auth_token), clients too.
    # cluster/runtime_env.yaml lists every folder the upload leaves out (.git, .venv included), so
    # Ray's own default list is switched off rather than warning once per folder it finds.
    return {"PYTHON": sys.executable, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
            "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": ""}


def job_env_vars() -> dict:
    """The env vars of cluster/runtime_env.yaml (quiet logs, no progress bars), plus this shell's
    offline and cache settings: the job and the app run with the same."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["env_vars"]
    env.update({k: os.environ[k] for k in ("HF_HUB_OFFLINE", "COMFUSION_CACHE") if k in os.environ})
    return {**env, "MLFLOW_TRACKING_URI": MLFLOW_URI}


def submit_training(config: str, photos: Path) -> None:
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"] = job_env_vars()
    sh(str(BIN / "ray"), "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
       "--runtime-env-json", json.dumps(runtime_env), "--",
       "python", "jobs/train_many.py", "--config", config,
       "--set", f"data.root={photos}", "--set", f"job.storage={STORAGE}", env=cluster_env())


def deploy_app(job_cfg) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    app = cfg["applications"][0]
    from comfusion.registry import serving_base  # noqa: PLC0415

    # the subjects' base model, not serve.yaml's default: their weights only fit the model they came from
    app["args"].update(**serving_base(job_cfg.model), tracking_uri=MLFLOW_URI,
                       cache_dir=str(STORAGE / "serve-cache"), default_steps=job_cfg.sampler.steps,
                       api_keys_file=str(KEYS_FILE), job_storage=str(STORAGE))  # POST /v1/subjects trains here
    app["runtime_env"] = {"env_vars": job_env_vars()}
    path = STORAGE / "run" / "serve-demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # `serve deploy` is declarative, so a second try is safe; on a busy machine Serve's first HTTP
    # proxy can die while starting, and the deploy then fails once with a 500.
    for attempt in (1, 2):
        try:
            sh(str(BIN / "serve"), "deploy", str(path), "--address", "http://127.0.0.1:8265", env=cluster_env())
            return
        except subprocess.CalledProcessError:
            if attempt == 2:
                raise
            print("serve deploy failed; trying once more", flush=True)
            time.sleep(5)


def demo_key() -> str:
    """A fresh admin key named `demo` (the previous demo key stops working): printed for the user."""
    # through the app's own command line: jobs/ does not import serve/ (DESIGN's layering)
    out = subprocess.run([sys.executable, "-m", "serve.auth", "create", "demo", "--admin", "--rate", "5",
                          "--burst", "50", "--replace", "--file", str(KEYS_FILE)],
                         cwd=REPO, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def http(method: str, url: str, key: str, body: dict | None = None, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for_subjects(ids: list[str], key: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            listed = {s["id"] for s in http("GET", f"{APP_URL}/v1/subjects", key, timeout=10)["subjects"]}
            if set(ids) <= listed:
                return
        except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError):
            pass
        time.sleep(2)
    raise TimeoutError(f"the Serve app did not list {ids} within {timeout:.0f} s (see `serve status`)")


def ask_for_images(ids: list[str], scenes: list[str], job_cfg, out: Path, key: str) -> dict[str, list[np.ndarray]]:
    """One picture per (subject, scene) from the app; the first scene's is saved as <out>/<id>.png."""
    out.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, list[np.ndarray]] = {}
    for sid in ids:
        pictures[sid] = []
        for scene in scenes:
            res = http("POST", f"{APP_URL}/v1/generate", key,
                       {"subject": sid, "scene": scene, "seed": 0, "steps": job_cfg.sampler.steps,
                        "guidance_scale": job_cfg.sampler.guidance_scale})
            png = base64.b64decode(res["images"][0])
            pictures[sid].append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
            if scene == scenes[0]:
                (out / f"{sid}.png").write_bytes(png)
            print(f"{sid}: '{res['prompt']}'")
    return pictures


def side_by_side(photos: dict[str, Path], pictures: dict[str, list[np.ndarray]], scenes: list[str], path: Path,
                 zoom: int = 4) -> None:
    """One row per subject: its first photo, a gap, then the app's pictures; enlarged `zoom` times
    with nearest-neighbour so the 32x32 pixels stay visible."""
    rows = []
    for sid, images in pictures.items():
        photo = np.asarray(Image.open(photos[sid]).convert("RGB"))
        gap = np.full((photo.shape[0], photo.shape[1] // 4, 3), 255, np.uint8)
        rows.append(np.concatenate([photo, gap, *images], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.Resampling.NEAREST).save(path)
    print(f"side by side (photo | {', '.join(scenes)}) -> {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml", help="job config, relative to the repository")
    ap.add_argument("--out", default=str(REPO / "demo_out"), help="where the app's images are saved")
    ap.add_argument("--stop", action="store_true", help="stop what the demo started")
    args = ap.parse_args(argv)
    if args.stop:
        sh("bash", "cluster/stop_local.sh", str(STORAGE), env=cluster_env())
        return 0
    t0 = time.monotonic()
    from comfusion.config import load_config  # noqa: PLC0415
    from jobs.demo_subjects import write_demo_subjects  # noqa: PLC0415

    photos = STORAGE / "demo_subjects"
    write_demo_subjects(photos)
    cfg = load_config(REPO / args.config, [f"data.root={photos}"])
    ids = [s.id for s in cfg.data.subjects]
    sh("bash", "cluster/start_local.sh", str(STORAGE), env=cluster_env())
    submit_training(args.config, photos)
    key = demo_key()
    deploy_app(cfg)
    wait_for_subjects(ids, key)
    scenes = list(cfg.data.scenes[:3])
    scene = scenes[0]
    pictures = ask_for_images(ids, scenes, cfg, Path(args.out), key)
    side_by_side({s.id: Path(s.images[0]) for s in cfg.data.subjects}, pictures, scenes, Path(args.out) / "demo.png")
    print(f"""
Ray dashboard:  http://127.0.0.1:8265
MLflow UI:      {MLFLOW_URI}   (experiment 'demo': losses, sample images, registered subjects)
Serve app:      {APP_URL}/docs   ("Authorize" with the key below); studio: {APP_URL}/studio/ (sign in with the key)
API key:        {key}
                (admin key `demo`, stored hashed in {KEYS_FILE}; a new one each `make demo`;
                 more keys: python -m serve.auth create NAME --file {KEYS_FILE})
Try it:
  export COMFUSION_KEY={key}
  curl -s -X POST {APP_URL}/v1/generate -H "Authorization: Bearer $COMFUSION_KEY" \\
       -H 'Content-Type: application/json' -H 'Accept: image/png' \\
       -d '{{"subject": "{ids[0]}", "scene": "{scene}", "seed": 1}}' -o {ids[0]}.png
Stop everything: make stop
(demo finished in {(time.monotonic() - t0) / 60:.1f} min)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
