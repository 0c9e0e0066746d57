#!/usr/bin/env bash
# Every GPU benchmark in one script (one H100: well within 8 minutes), one table at the end.
# Needs only `comfusion` (plus the diffusers wheel and, for 8-bit Adam, bitsandbytes): no Ray,
# no MLflow. Usage, from the repository root on a CUDA machine:
#   bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/comfusion-gpu}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  local t0=$(date +%s)
  timeout 300 "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -i warn | tail -25
  echo "== $name: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"
}

# Sampling: sd15-arch 512x512, 30 DDIM steps, guidance 7.5 (target <= 0.6 s/image).
run sample $PY benchmarks/sample.py --preset sd15-arch --images 32 --batch 8
# Training steps: dreambooth, comfusion and the ablations, bf16 + checkpointing + 8-bit AdamW
# (targets: 1200 ComFusion steps in <= 90 s, peak <= 40 GB).
run train_step $PY benchmarks/train_step.py --preset sd15-arch --steps 8 --warmup 2
# LoRA ComFusion (LoRA subjects): sd15-arch 512 px, bf16, checkpointing, 8-bit AdamW, rank-4 UNet
# attention adapters, base frozen (target: peak <= 16 GB, so a 24 GB GPU trains it).
run lora_step $PY - <<'PYEOF'
import sys; sys.path.insert(0, "benchmarks")
from train_step import base_config, measure, synthetic_inputs
cfg = base_config("sd15-arch", True).replace(**{"train.adapter": "lora"})
assert cfg.model.resolution == 512 and cfg.train.optimizer == "adamw8bit" and cfg.train.mixed_precision == "bf16"
subject, priors = synthetic_inputs("sd15-arch", 15)
r = measure(cfg, subject, priors, "cuda", 2, 8)
print(f"lora_comfusion s_per_step={r['sec']:.3f} peak_gib={r['peak_gib']:.1f} "
      f"target_peak<=16 {'OK' if r['peak_gib'] <= 16 else 'MISSED'}")
PYEOF
# Priors: 200 at 512x512, 30 steps, guidance 7.5, batched, plain loop (target <= 60 s).
run priors $PY - <<'PYEOF'
import time, torch
from comfusion.models import load_base
from comfusion.sampling import sample, default_dtype
from comfusion.prompts import PAPER_SCENES
parts = load_base("sd15-arch", device="cuda", dtype=default_dtype("cuda"))
prompts = [f"a dog {PAPER_SCENES[i % 15]}" for i in range(200)]
sample(parts, prompts[:16], list(range(16)), steps=2, batch_size=16)
torch.cuda.synchronize(); t0 = time.perf_counter()
sample(parts, prompts, list(range(200)), steps=30, guidance_scale=7.5, batch_size=16)
torch.cuda.synchronize(); dt = time.perf_counter() - t0
print(f"priors=200 seconds={dt:.1f} target<=60 {'OK' if dt <= 60 else 'MISSED'}")
PYEOF
# Serve: full-weight swap into a loaded pipeline (target <= 0.3 s) vs building a pipeline.
run swap $PY benchmarks/serve_load.py --preset sd15-arch --skip-load --repeats 4

echo
echo "| benchmark | figure |"
echo "|---|---|"
grep -h "s_per_image\|fraction_of_floor" "$OUT/sample.log" | sed 's/^/| sample | /; s/$/ |/'
grep -h -E "^(dreambooth|comfusion|w/o|tau)" "$OUT/train_step.log" | sed 's/^/| train_step | /; s/$/ |/'
grep -h "lora_comfusion" "$OUT/lora_step.log" | sed 's/^/| lora_step | /; s/$/ |/'
grep -h "priors=" "$OUT/priors.log" | sed 's/^/| priors | /; s/$/ |/'
grep -h -i "swap" "$OUT/swap.log" | tail -3 | sed 's/^/| swap | /; s/$/ |/'
