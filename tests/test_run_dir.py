"""A run directory is not silently replaced, and a SLURM job is not rendered for hardware it cannot run on."""
from __future__ import annotations

from .conftest import REPO, check, metrics, run_cli, tiny_config, write_config


def test_a_second_run_into_the_same_directory_is_refused_until_asked(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(run_dir, train={"max_steps": 4, "save_every": 2}))
    check(run_cli("train", "--config", str(cfg)))
    first = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    history = (run_dir / "metrics.jsonl").read_text()

    again = run_cli("train", "--config", str(cfg))
    assert again.returncode == 2
    line = again.stderr.strip().splitlines()[-1]
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == first  # nothing touched
    assert (run_dir / "metrics.jsonl").read_text() == history

    # --overwrite: a new run from step 0, none of the old one's checkpoints or metrics left to resume or prune
    short = write_config(tmp_path / "s.yaml", tiny_config(run_dir, train={"max_steps": 2}))
    check(run_cli("train", "--config", str(short), "--overwrite"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002"]
    assert max(m["step"] for m in metrics(run_dir)) == 2


def test_a_cpu_job_for_a_gpu_sized_config_is_refused(tmp_path):
    proc = run_cli("submit", "--config", str(REPO / "configs/gpt3-175b-lora.yaml"), "--set",
                   f"run_dir={tmp_path / 'j'}", "--sweep", "method.r=4,8", "--dry-run")
    assert proc.returncode == 2 and "--gpus-per-node=0" in proc.stderr and "GiB per rank" in proc.stderr
    ok = run_cli("submit", "--config", str(REPO / "configs/gpt3-175b-lora.yaml"), "--set",
                 f"run_dir={tmp_path / 'j'}", "--nodes", "12", "--gpus-per-node", "8", "--dry-run")
    check(ok)
    assert "#SBATCH --nodes=12" in ok.stdout


def test_a_run_prints_no_library_noise_and_builds_no_op(tmp_path):
    """DeepSpeed's deprecated-collective FutureWarnings came twice a step (~500 lines in the default run), and
    its shared-memory comm op (unused by training) was JIT-compiled for ~60 s on a fresh machine."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", train={"max_steps": 6},
                                                        zero={"stage": 3, "param_persistence_threshold": 0}))
    proc = check(run_cli("train", "--config", str(cfg), fresh=True))  # a whole process start: imports warn too
    out = proc.stdout + proc.stderr
    assert "FutureWarning" not in out and "is deprecated" not in out
    assert "deepspeed_shm_comm" not in out and "built successfully" not in out
