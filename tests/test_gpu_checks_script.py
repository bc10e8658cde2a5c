"""launch/gpu_checks.sh, the one prepared command for a lent GPU machine (docs/benchmarks.md, "GPU validation"): it
parses, refuses an unknown step, and without CUDA runs to the end at once, every GPU step in summary.md as
"skipped: no CUDA", leaving only what the device tool brings back (at most 8 files, no deeper than $OUT/a/b/file)."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile

from tests.conftest import REPO

SCRIPT = REPO / "launch" / "gpu_checks.sh"
GPU_STEPS = ["install", "gpu-tests", "precision-fp16", "qlora-nf4", "accounting", "latency", "throughput", "peft"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECKS_")}
    # CUDA_VISIBLE_DEVICES="": the dry run even where a GPU is present
    return dict(env, GPU_CHECKS_PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", **extra)


def test_script_parses_and_refuses_an_unknown_step(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(OUT=str(tmp_path), GPU_CHECKS_ONLY="gpu-tests,nope"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no step 'nope'" in proc.stdout and "precision-fp16" in proc.stdout
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_dry_run_without_cuda_lists_every_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(OUT=str(out)), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the first lines say which Python and torch the machine has, before any step runs
    assert proc.stdout.splitlines()[0].startswith(f"python: {sys.executable}")
    assert proc.stdout.splitlines()[1].startswith("torch ") and "cuda available: False" in proc.stdout
    summary = (out / "summary.md").read_text()
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| step")]
    assert [r[0] for r in rows] == ["env", *GPU_STEPS]
    status = {r[0]: r[1] for r in rows}
    assert status["env"] == "ok" and all(status[s] == "skipped: no CUDA" for s in GPU_STEPS), status
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["results.tar.gz", "summary.md"]
    with tarfile.open(out / "results.tar.gz") as bundle:
        assert {"results/logs/env.log", "results/facts.txt"} <= set(bundle.getnames())
