"""`python -m bigadapt.bench.accounting_runs OUT_DIR`: real short runs (methods x world sizes x dtypes) and
the table of predicted vs measured per-rank model-state bytes that docs/accounting.md shows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ..config import EMBEDDED_DEFAULT
from ..methods import METHODS

CASES = [  # (method, world size, base dtype, persistence threshold)
    ("lora", 1, "fp32", 0), ("lora", 2, "fp32", 0), ("lora", 2, "bf16", 0), ("lora", 2, "fp32", 20000),
    ("bitfit", 1, "fp32", 0), ("bitfit", 2, "bf16", 0), ("full", 1, "fp32", 0), ("full", 2, "fp32", 0),
    ("adapter_h", 2, "fp32", 0),
]


def run_case(out: Path, method: str, world: int, dtype: str, threshold: int) -> Path:
    run_dir = out / f"{method}-w{world}-{dtype}-t{threshold}"
    cfg = dict(EMBEDDED_DEFAULT, run_dir=str(run_dir))
    cfg.update(method=dict(cfg["method"], name=method), model=dict(cfg["model"], dtype=dtype),
               train=dict(cfg["train"], max_steps=3, eval_every=0, save_every=0, warmup_steps=0),
               zero={"stage": 3, "param_persistence_threshold": threshold})
    path = out / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(world), "launch/train.py", "--config", str(path)]
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=Path(__file__).resolve().parents[2])
    return run_dir


def row(run_dir: Path) -> str:
    report = json.loads((run_dir / "accounting.json").read_text())
    pred, meas = report["predicted"]["model_states"], report["measured"][0]["model_states"]
    return (f"| {run_dir.name} | {pred:,} | {meas:,} | {100 * report['model_states_max_rel_error']:.2f}% |")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/accounting")
    out.mkdir(parents=True, exist_ok=True)
    print("| run (method-world-dtype-persistence) | predicted bytes (rank 0) | measured bytes (rank 0) "
          "| worst rank error |\n| --- | ---: | ---: | ---: |")
    for case in CASES:
        if case[0] in METHODS:
            print(row(run_case(out, *case)), flush=True)


if __name__ == "__main__":
    main()
