"""The job script against real SLURM daemons: two emulated nodes on this host (slurm/localhost).

The trainer here is tests/slurm/fake_trainer.py, which keeps launch/train.py's contract (checkpoint and
exit 3 on SIGUSR1/SIGTERM, resume on restart) in a fraction of the time: it exercises the job script's
edge cases (each rank's rendezvous environment, external requeue, scancel, failures, unshared run dirs). The
real trainer's runs — two nodes, USR1 preemption, sweeps — come last, submitted with `bigadapt submit` exactly
as a user would (the job runs launch/train.py). One file, so that pytest-xdist (`--dist loadfile`) runs every
test against the one set of daemons on one worker.

No test waits for time to pass: a run that is to be signalled mid-run holds at a given step until the signal
comes (fake_trainer.py --hold-at, BIGADAPT_FAULT_HOLD_AT_STEP for the real trainer), and the test sends it on
seeing that step, so it lands at that step however fast or loaded the machine is.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint
from bigadapt.errors import ConfigError, SlurmError
from bigadapt.slurm import (
    JobSpec,
    JobState,
    TaskOverride,
    job_state,
    job_states,
    read_events,
    render_job_script,
    submit,
    write_job_script,
)

from ..conftest import run_cli, tiny_config, write_config

pytestmark = pytest.mark.slurm
needs_cluster = pytest.mark.usefixtures("slurm_cluster")  # rendering alone runs anywhere

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
TRAINER_ARGS = [str(FAKE_TRAINER), "--run-dir", "{run_dir}"]
STEPS = 16
HOLD = 3  # the step a signalled fake run waits at (--hold-at) for the test's signal
DONE = {"step": STEPS, "total": 2 * sum(range(1, STEPS + 1))}  # 2 ranks, uninterrupted: what a resume must reach


# --- helpers -----------------------------------------------------------------------------------


def spec(run_dir: Path, name: str, *extra: str, **kw: object) -> JobSpec:
    kw = {"nodes": 2, "time": "00:05:00"} | kw
    return JobSpec(
        name=f"bigadapt-test-{name}",
        run_dir=str(run_dir),
        train_args=[*TRAINER_ARGS, *extra],
        **kw,  # type: ignore[arg-type]
    )


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_job(job_id: str, timeout: float = 60) -> list[JobState]:
    """Poll `scontrol show job` (not `sbatch --wait`, which polls slowly) until every task ended."""

    def ended() -> list[JobState] | None:
        states = job_states(job_id)
        return states if states and all(s.done for s in states) else None

    return wait_until(ended, timeout, f"job {job_id} to end")  # type: ignore[return-value]


def wait_step(run_dir: Path, step: int, timeout: float = 60) -> None:
    def reached() -> bool:
        try:
            return json.loads((run_dir / "progress.json").read_text())["step"] >= step
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    wait_until(reached, timeout, f"{run_dir} to reach step {step}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def rank_envs(run_dir: Path, restart: int) -> list[dict]:
    files = sorted((run_dir / "ranks").glob(f"rank-*.restart-{restart}.json"))
    return [read_json(f) for f in files]


def event_names(run_dir: Path) -> list[str]:
    return [e["event"] for e in read_events(run_dir)]


def log_text(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("slurm-*.out")))


# --- (a) rendering -----------------------------------------------------------------------------


def test_render_is_valid_bash_with_the_right_sbatch_lines(tmp_path: Path) -> None:
    text = render_job_script(spec(tmp_path, "render", "--steps", "3", partition="debug"))
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/logs/slurm-%j.out",
        f"#SBATCH --error={tmp_path}/logs/slurm-%j.out",
        "#SBATCH --partition=debug",
        "#SBATCH --time=00:05:00",
    ]:
        assert line in text.splitlines()
    assert "--nproc_per_node" in text and "scontrol requeue" in text and "trap 'forward USR1' USR1" in text
    assert "${" + "run_dir}" not in text and "${train_cmd}" not in text  # every key filled in
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_render_array_uses_per_task_run_dirs(tmp_path: Path) -> None:
    tasks = [TaskOverride(str(tmp_path / "a"), ["--steps", "2"]), TaskOverride(args=["--steps", "3"])]
    text = render_job_script(spec(tmp_path, "array", nodes=1, task_overrides=tasks))
    assert "#SBATCH --array=0-1" in text
    assert f"#SBATCH --output={tmp_path}/logs/slurm-%A_%a.out" in text
    assert f"0) RUN_DIR={tmp_path}/a; EXTRA_ARGS=(--steps 2) ;;" in text
    assert '1) RUN_DIR="$RUN_DIR/task-1"; EXTRA_ARGS=(--steps 3) ;;' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_render_rejects_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run_dir"):
        render_job_script(spec(Path("relative/dir"), "bad"))
    with pytest.raises(ConfigError, match="time"):
        render_job_script(spec(tmp_path, "bad", time="90"))


@needs_cluster
def test_dry_run_asks_the_controller_and_submits_nothing(tmp_path: Path) -> None:
    script = write_job_script(spec(tmp_path, "dry"))
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    assert submit(script, dry_run=True) is None
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


# --- (b) two nodes, one torchrun each, (c) preemption: checkpoint, requeue, resume ---------------


@pytest.fixture(scope="module")
def requeued_run(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobState]:
    """A 2-node run that SLURM itself requeues at step HOLD (`scontrol requeue`: the ranks get SIGTERM and have
    KillWait to checkpoint), then resumes: both starts' ranks record their environment."""
    run_dir = tmp_path_factory.mktemp("requeue")
    job_id = submit(write_job_script(spec(run_dir, "requeue", "--steps", str(STEPS), "--hold-at", str(HOLD))))
    assert job_id
    wait_step(run_dir, HOLD)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    (state,) = wait_job(job_id, timeout=90)
    return run_dir, state


@needs_cluster
def test_two_nodes_make_one_world(requeued_run: tuple[Path, JobState]) -> None:
    run_dir, state = requeued_run
    for restart in (0, 1):  # the requeued start meets at the same rendezvous: the port is the job id's
        envs = rank_envs(run_dir, restart)
        assert sorted(e["RANK"] for e in envs) == ["0", "1"]
        assert sorted(e["SLURM_NODEID"] for e in envs) == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert {e["LOCAL_RANK"] for e in envs} == {"0"}  # --nproc_per_node 1 on each node
        assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}  # n1's NodeAddr
        assert {e["MASTER_PORT"] for e in envs} == {str(20000 + int(state.job_id) % 10000)}
        assert {e["OMP_NUM_THREADS"] for e in envs} == {"1"}
    assert sorted(p.name for p in run_dir.glob(".node-*")) == [".node-0", ".node-1"]


@needs_cluster
def test_external_requeue_checkpoints_and_resumes(requeued_run: tuple[Path, JobState]) -> None:
    run_dir, state = requeued_run
    assert state.state == "COMPLETED", log_text(run_dir)
    assert state.restarts == 1
    assert read_json(run_dir / "ckpt.json")["step"] == HOLD  # stopped where the signal came, at a boundary
    assert {e["SLURM_RESTART_COUNT"] for e in rank_envs(run_dir, 1)} == {"1"}
    assert read_json(run_dir / "done.json") == DONE  # resumed exactly: the uninterrupted run's sum
    assert event_names(run_dir)[-2:] == ["start", "finish"]


@needs_cluster
def test_scancel_is_final_not_a_requeue(tmp_path: Path) -> None:
    job_id = submit(write_job_script(spec(tmp_path, "cancel", "--steps", str(STEPS), "--hold-at", "2")))
    assert job_id
    wait_step(tmp_path, 2)
    subprocess.run(["scancel", job_id], check=True)
    (state,) = wait_job(job_id)
    assert (state.state, state.restarts) == ("CANCELLED", 0)
    assert "requeue" not in event_names(tmp_path)
    assert event_names(tmp_path)[-1] == "cancelled"
    assert read_json(tmp_path / "ckpt.json")["step"] == 2  # SIGTERM still gave a checkpoint


@needs_cluster
def test_other_exit_codes_fail_the_job_without_requeue(tmp_path: Path) -> None:
    job_id = submit(write_job_script(spec(tmp_path, "fail", "--steps", "5", "--fail-at", "2", "--fail-code", "5")))
    assert job_id
    (state,) = wait_job(job_id)
    assert (state.state, state.exit_code, state.restarts) == ("FAILED", 5, 0)
    events = read_events(tmp_path)
    assert [e["event"] for e in events] == ["start", "failed"]
    assert events[-1]["rc"] == "5" and events[-1]["ranks"] == "0:5,1:5"


@needs_cluster
def test_run_dir_not_visible_from_a_node_exits_2(tmp_path: Path) -> None:
    script = write_job_script(spec(tmp_path, "notshared"))
    # Emulated nodes share one disk: make node 1 fail its touch, as if it did not mount run_dir.
    touch = """bash -c 'touch "$1/.node-$SLURM_NODEID"'"""
    text = script.read_text()
    assert touch in text
    script.write_text(
        text.replace(touch, """bash -c '((SLURM_NODEID == 1)) && exit 1; touch "$1/.node-$SLURM_NODEID"'""")
    )
    job_id = submit(script)
    assert job_id
    (state,) = wait_job(job_id)
    assert (state.state, state.exit_code) == ("FAILED", 2)
    assert read_events(tmp_path)[-1] | {"time": ""} == {
        "time": "",
        "event": "failed",
        "job": job_id,
        "restart": "0",
        "rc": "2",
        "reason": "run-dir-not-shared",
        "nodes": "1",
    }
    assert "is not visible from node(s) 1" in log_text(tmp_path)
    assert not (tmp_path / "ranks").exists()  # training never started


# --- (d) sbatch errors (arrays: test_sweep_runs_one_array_task_per_point, below) -------------------


@needs_cluster
def test_sbatch_error_surfaces_verbatim(tmp_path: Path) -> None:
    script = write_job_script(spec(tmp_path, "badpart", partition="no-such-partition"))
    direct = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    assert direct.returncode != 0
    with pytest.raises(SlurmError) as err:
        submit(script)
    message = str(err.value)
    assert direct.stderr.strip() in message  # sbatch's own words, unedited
    assert "invalid partition" in message.lower()
    assert message.splitlines()[-1].startswith("hint: ") and "sinfo" in message


# ---------------------------------------------------------------- the real trainer: 2 nodes, ZeRO-3 across them
REAL_STEPS = 8  # a few steps either side of the preemption: the assertions need no more
PREEMPT_AT = 3  # the preempted run holds after this step (BIGADAPT_FAULT_HOLD_AT_STEP) until the test's USR1


def _submit(tmp: Path, name: str, *args: str, extra_env: dict | None = None, **sections) -> tuple[str, Path]:
    run_dir = tmp / name
    sections.setdefault("train", {"max_steps": REAL_STEPS, "log_every": 1, "keep_last": 2})
    cfg = write_config(tmp / f"{name}.yaml", tiny_config(run_dir, **sections))
    proc = run_cli("submit", "--config", str(cfg), "--time", "00:10:00", "--name", f"bigadapt-test-{name}", *args,
                   extra_env=extra_env)  # sbatch exports the submitting environment to the job
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1], run_dir


def _adapter(run_dir: Path) -> dict:
    return load_file(checkpoint.complete(run_dir / "checkpoints")[-1] / "adapter.safetensors")


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(x).get("step", 0) for x in lines if x), default=0)


@pytest.fixture(scope="module")
def real_reference(slurm_cluster, tmp_path_factory) -> Path:
    job, run_dir = _submit(tmp_path_factory.mktemp("ref"), "ref", "--nodes", "2")
    (state,) = wait_job(job, timeout=300)
    assert state.state == "COMPLETED", (run_dir / "logs").glob("*.out")
    return run_dir


@needs_cluster
def test_two_nodes_train_one_zero3_world(real_reference):
    layout = json.loads((real_reference / "layout.json").read_text())
    assert layout["world_size"] == 2
    assert all(abs(r["base_numel"] - layout["base_numel_total"] / 2) <= 60 for r in layout["ranks"])
    assert [e["event"] for e in read_events(real_reference)] == ["start", "finish"]
    assert _last_step(real_reference) == REAL_STEPS


@needs_cluster
def test_preempted_job_requeues_and_ends_with_the_same_adapter(real_reference, tmp_path):
    # The run holds after step PREEMPT_AT until a signal comes: sent on seeing that step, it lands there on any machine
    job, run_dir = _submit(tmp_path, "preempt", "--nodes", "2",
                           extra_env={"BIGADAPT_FAULT_HOLD_AT_STEP": str(PREEMPT_AT)})
    wait_until(lambda: _last_step(run_dir) >= PREEMPT_AT, 300, f"training to log step {PREEMPT_AT}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1 sends
    (state,) = wait_job(job, timeout=300)
    assert state.state == "COMPLETED" and state.restarts == 1
    events = read_events(run_dir)
    assert [e["event"] for e in events] == ["start", "signal", "preempted", "requeue", "start", "finish"]
    assert events[2]["ranks"] == "0:3,1:3"  # each rank's own exit code: both checkpointed (torchrun saw 0)
    assert events[4]["restart"] == "1"  # the requeued start knows it is one (SLURM_RESTART_COUNT)
    stopped = [c.name for c in checkpoint.complete(run_dir / "checkpoints")]
    assert stopped == [f"step-{PREEMPT_AT:08d}", f"step-{REAL_STEPS:08d}"]  # the preemption's, then the last
    ref, got = _adapter(real_reference), _adapter(run_dir)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)  # bitwise on CPU


@needs_cluster
def test_sweep_runs_one_array_task_per_point(tmp_path):
    job, run_dir = _submit(tmp_path, "sweep", "--sweep", "method.r=2,4,8", train={"max_steps": 3})
    states = wait_job(job, timeout=300)
    assert sorted(s.job_id for s in states) == [f"{job}_{i}" for i in range(3)]
    assert all(s.state == "COMPLETED" for s in states)
    task_job = {s.fields["ArrayTaskId"]: s.fields["JobId"] for s in states}  # each task has a job id of its own
    for i, r in enumerate((2, 4, 8)):
        task = run_dir / f"r={r}"
        assert _adapter(task)["transformer.h.0.attn.c_attn.lora_A"].shape == (2 * r, 64)
        events = read_events(task)  # task i started, and finished, in point i's own run directory, alone
        assert [(e["event"], e["job"]) for e in events] == [("start", task_job[str(i)]), ("finish", task_job[str(i)])]
        assert json.loads((task / "layout.json").read_text())["world_size"] == 1
        assert (run_dir / "logs" / f"slurm-{job}_{i}.out").exists()
    one = job_state(f"{job}_1")
    assert (one.job_id, one.fields["JobId"], one.state) == (f"{job}_1", task_job["1"], "COMPLETED")
    out = run_cli("status", str(run_dir)).stdout
    assert out.count("checkpoint step-00000003") == 3 and f"job {job}" in out


@needs_cluster
def test_submit_errors_are_one_line(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    proc = run_cli("submit", "--config", str(cfg), "--sweep", "method.r=4,0")
    assert proc.returncode == 2 and "method.r=0" in proc.stderr  # every sweep point is checked first
    proc = run_cli("submit", "--config", str(cfg), "--partition", "nosuch")
    assert proc.returncode == 2 and "invalid partition" in proc.stderr.lower() and "hint:" in proc.stderr
