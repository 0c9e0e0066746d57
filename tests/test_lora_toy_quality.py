"""benchmarks/toy_quality.py has the rows "DreamBooth (LoRA)" and "ComFusion (LoRA)": a tiny run
trains them (LoRA subjects) and scores them beside DreamBooth at the same steps."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_lora_rows_train_and_score(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "toy_quality.py"), "--instances", "1",
                           "--steps", "2", "--scenes", "2", "--images-per-scene", "1", "--priors", "2",
                           "--variants", "dreambooth", "dreambooth_lora", "comfusion_lora", "--workers", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln.split("|")[1].strip() for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert "DreamBooth (LoRA)" in rows and "ComFusion (LoRA)" in rows and "DreamBooth" in rows
