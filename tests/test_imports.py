"""comfusion/ is the algorithm: it must never import ray or mlflow (DESIGN.md)."""
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).parents[1] / "comfusion"


def test_comfusion_imports_neither_ray_nor_mlflow():
    mods = sorted(p.relative_to(PKG.parent).with_suffix("").as_posix().replace("/", ".")
                  for p in PKG.rglob("*.py") if p.name != "__main__.py")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]\n"
            "assert not bad, bad\nprint(len(sys.argv))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for p in PKG.rglob("*.py"):
        for line in p.read_text().splitlines():
            s = line.strip()
            assert not s.startswith(("import ray", "from ray", "import mlflow", "from mlflow")), f"{p}: {s}"


def test_the_train_controller_finds_the_worker_loop_without_torch():
    """The Train controller of every slot unpickles `jobs.train_worker`'s functions: torch,
    diffusers, transformers and MLflow would add seconds to every slot start (they load in the
    worker, where they are used; the driver needs only torch, for the photo checks)."""
    code = ("import sys\nimport jobs.train_worker\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'mlflow') if m in sys.modules]\n"
            "assert not heavy, heavy\nimport jobs.train_many\n"
            "heavy = [m for m in ('diffusers', 'transformers', 'mlflow') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-2000:]
