"""The job script against real SLURM daemons: two emulated nodes on this host (slurm/localhost).

The trainer here is tests/slurm/fake_trainer.py, which keeps launch/train.py's contract (checkpoint and
exit 3 on SIGUSR1/SIGTERM, resume on restart) in a fraction of the time: it exercises the job script's
edge cases (external requeue, scancel, failures, unshared run dirs). The real trainer's runs — two nodes,
USR1 preemption, sweeps — are in test_real_trainer.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bigadapt.errors import ConfigError, SlurmError
from bigadapt.slurm import (
    JobSpec,
    JobState,
    TaskOverride,
    job_states,
    read_events,
    render_job_script,
    submit,
    write_job_script,
)

pytestmark = pytest.mark.slurm
needs_cluster = pytest.mark.usefixtures("slurm_cluster")  # rendering alone runs anywhere

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
TRAINER_ARGS = [str(FAKE_TRAINER), "--run-dir", "{run_dir}", "--step-time", "0.3"]
STEPS = 16


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


# --- (b) two nodes, one torchrun each ----------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobState]:
    """An uninterrupted 2-node run: the baseline the preempted runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    job_id = submit(write_job_script(spec(run_dir, "reference", "--steps", str(STEPS))))
    assert job_id
    (state,) = wait_job(job_id)
    return run_dir, state



# --- (c) preemption: checkpoint, requeue, resume -----------------------------------------------


def _assert_resumed_like_reference(run_dir: Path, job_id: str, reference: Path) -> None:
    (state,) = wait_job(job_id, timeout=90)
    assert state.state == "COMPLETED", log_text(run_dir)
    assert state.restarts == 1
    assert 0 < read_json(run_dir / "ckpt.json")["step"] < STEPS  # stopped mid-run, at a boundary
    assert {e["SLURM_RESTART_COUNT"] for e in rank_envs(run_dir, 1)} == {"1"}
    assert read_json(run_dir / "done.json") == read_json(reference / "done.json")



@needs_cluster
def test_external_requeue_checkpoints_and_resumes(reference_run: tuple[Path, JobState], tmp_path: Path) -> None:
    job_id = submit(write_job_script(spec(tmp_path, "requeue", "--steps", str(STEPS))))
    assert job_id
    wait_step(tmp_path, 3)
    # SLURM itself requeues: the ranks get SIGTERM and have KillWait to checkpoint.
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _assert_resumed_like_reference(tmp_path, job_id, reference_run[0])
    assert event_names(tmp_path)[-2:] == ["start", "finish"]


@needs_cluster
def test_scancel_is_final_not_a_requeue(tmp_path: Path) -> None:
    job_id = submit(write_job_script(spec(tmp_path, "cancel", "--steps", "40")))
    assert job_id
    wait_step(tmp_path, 2)
    subprocess.run(["scancel", job_id], check=True)
    (state,) = wait_job(job_id)
    assert (state.state, state.restarts) == ("CANCELLED", 0)
    assert "requeue" not in event_names(tmp_path)
    assert event_names(tmp_path)[-1] == "cancelled"
    assert read_json(tmp_path / "ckpt.json")["step"] >= 2  # SIGTERM still gave a checkpoint


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


# --- (d) arrays ------------------------------------------------------------------------------------



# --- (e) sbatch errors ---------------------------------------------------------------------------


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
