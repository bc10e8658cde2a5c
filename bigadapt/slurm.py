"""SLURM launch: render a job script from bigadapt/templates/job.sbatch, submit it, watch it.

The job script runs one torchrun per node through one `srun`, forwards SIGUSR1/SIGTERM to every
rank, and requeues the job when the ranks exit with EXIT_PREEMPTED (3). See bigadapt/templates/job.sbatch.

Every rank runs as `python -m bigadapt.slurm_rank TRAIN_SCRIPT ARGS...` (or `-m MODULE ARGS...`, slurm_rank.py):
that runs the trainer in-process and records its exit code, which torchrun would otherwise flatten to 1.

`<run_dir>/logs/events.log` gets one line per event, parsed by `read_events`:
    <UTC time> <event> job=<id> restart=<n> [key=value ...]
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from bigadapt.errors import EXIT_PREEMPTED, ConfigError, SlurmError

REPO_ROOT = Path(__file__).resolve().parent.parent
# package data: the template ships inside the package, so a wheel install renders jobs too
TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "job.sbatch"
RUN_DIR_TOKEN = "{run_dir}"  # in train_args / TaskOverride.args: the (per-task) run directory

_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
_KEY_RE = re.compile(r"\$\{([a-z_][a-z0-9_]*)\}")  # template keys are lowercase by convention


@dataclass
class TaskOverride:
    """Settings of one array task (index = SLURM_ARRAY_TASK_ID)."""

    run_dir: str | None = None  # default: <JobSpec.run_dir>/task-<id>
    args: list[str] = field(default_factory=list)  # appended to JobSpec.train_args


@dataclass
class JobSpec:
    """What to run where. run_dir must be absolute and visible from every node."""

    name: str
    run_dir: str
    train_args: list[str]  # e.g. ["launch/train.py", "--config", "{run_dir}/config.yaml", "--resume", "auto"]
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU job
    ranks_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU
    cpus_per_node: int = 1  # CPUs for the node's launcher and its ranks
    time: str = "01:00:00"  # [D-]HH:MM:SS; SLURM counts whole minutes
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None  # per node, SLURM syntax ("64G", "0" = all); None: cluster default
    signal_lead_s: int = 120  # SIGUSR1 this long before the time limit
    python: str = sys.executable  # the venv's python (not resolved: the venv is its bin dir)
    activate: str | None = None  # extra setup line, e.g. "module load cuda/12.4"
    env: dict[str, str] = field(default_factory=dict)
    # relative paths (train_args, a relative config) resolve here: the checkout, or where `submit` ran
    workdir: str = field(default_factory=lambda: str(REPO_ROOT) if _needs_pythonpath() else os.getcwd())
    array: str | None = None  # e.g. "0-2%2"; default "0-<n-1>" when task_overrides is given
    task_overrides: list[TaskOverride] = field(default_factory=list)
    extra_sbatch: list[str] = field(default_factory=list)  # raw options, e.g. ["--exclusive"]
    straggler_wait_s: int = 120  # after one node's launcher exits, others get this long

    @property
    def is_array(self) -> bool:
        return bool(self.array or self.task_overrides)

    @property
    def rank_count(self) -> int:
        return self.ranks_per_node or self.gpus_per_node or 1


@dataclass
class JobState:
    """One job (or array task) as `scontrol show job` reports it."""

    job_id: str  # "123" or "123_4" for an array task
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ...
    reason: str
    restarts: int
    exit_code: int  # of the batch script
    exit_signal: int
    fields: dict[str, str]

    @property
    def done(self) -> bool:
        return self.state in _FINAL_STATES


_FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


# --- rendering ---------------------------------------------------------------------------------


def validate(spec: JobSpec) -> None:
    """Raise ConfigError naming the field, the bad value and the fix."""

    def bad(name: str, value: object, fix: str) -> ConfigError:
        return ConfigError(f"slurm.{name}={value!r}: {fix}")

    if not Path(spec.run_dir).is_absolute():
        raise bad("run_dir", spec.run_dir, "use an absolute path on a file system all nodes mount")
    for d in [spec.run_dir] + [t.run_dir for t in spec.task_overrides if t.run_dir]:
        if re.search(r"[\s%]", d) or not Path(d).is_absolute():
            raise bad("run_dir", d, "absolute, without spaces or '%' (SLURM filename patterns)")
    if not re.fullmatch(r"[\w.+-]+", spec.name):
        raise bad("name", spec.name, "use letters, digits, '.', '-', '_'")
    if not _TIME_RE.match(spec.time):
        raise bad("time", spec.time, "write [D-]HH:MM:SS, e.g. 04:00:00")
    for key in ("nodes", "cpus_per_node"):
        if getattr(spec, key) < 1:
            raise bad(key, getattr(spec, key), "must be at least 1")
    if spec.gpus_per_node < 0:
        raise bad("gpus_per_node", spec.gpus_per_node, "0 for CPU jobs, else GPUs per node")
    ranks = spec.rank_count
    if spec.gpus_per_node and ranks != spec.gpus_per_node:
        raise bad("ranks_per_node", ranks, f"one rank per GPU: set it to {spec.gpus_per_node} or leave it unset")
    if not spec.gpus_per_node and ranks > spec.cpus_per_node:
        raise bad("ranks_per_node", ranks, f"at most cpus_per_node={spec.cpus_per_node} ranks on a CPU node")
    if spec.signal_lead_s < 0:
        raise bad("signal_lead_s", spec.signal_lead_s, "seconds before the time limit, >= 0")
    if not spec.train_args:
        raise bad("train_args", spec.train_args, "give the training script and its arguments")


def render_job_script(spec: JobSpec, template: str | None = None) -> str:
    """The job script as text: bigadapt/templates/job.sbatch (or `template`) with the spec filled in."""
    validate(spec)
    text = TEMPLATE_PATH.read_text() if template is None else template
    values = _template_values(spec)
    missing = sorted(set(_KEY_RE.findall(text)) - values.keys())
    if missing:
        raise ConfigError(f"job template has unknown keys {missing}: known are {sorted(values)}")
    return Template(text).safe_substitute(values)  # safe: UPPERCASE shell ${VARS} stay as they are


def write_job_script(spec: JobSpec, path: str | Path | None = None) -> Path:
    """Render to `path` (default <run_dir>/job.sbatch) and create the log directory."""
    script = Path(path) if path else Path(spec.run_dir) / "job.sbatch"
    text = render_job_script(spec)
    (Path(spec.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    script.chmod(0o755)
    return script


def _template_values(spec: JobSpec) -> dict[str, str]:
    python_bin = os.path.dirname(os.path.abspath(spec.python))
    return {
        "sbatch_lines": "\n".join(f"#SBATCH {opt}" for opt in _sbatch_options(spec)),
        "run_dir": shlex.quote(spec.run_dir),
        "task_select": _task_select(spec),
        "train_cmd": _shell_args(spec.train_args),
        "python": shlex.quote(os.path.abspath(spec.python)),
        "python_bin": shlex.quote(python_bin),
        "activate": spec.activate or "# (no extra activation line)",
        "omp_threads": str(max(1, spec.cpus_per_node // spec.rank_count)),
        "env_exports": _env_exports(spec),
        "ranks_per_node": str(spec.rank_count),
        "cpus_per_node": str(spec.cpus_per_node),
        "srun_gpus": f"--gpus-per-node={spec.gpus_per_node} " if spec.gpus_per_node else "",
        "straggler_wait": str(spec.straggler_wait_s),
        "signal_lead": str(spec.signal_lead_s),
        "exit_preempted": str(EXIT_PREEMPTED),
    }


def _sbatch_options(spec: JobSpec) -> list[str]:
    log = f"{spec.run_dir}/logs/slurm-{'%A_%a' if spec.is_array else '%j'}.out"
    opts = [
        f"--job-name={spec.name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",  # one launcher per node; it starts the ranks
        f"--cpus-per-task={spec.cpus_per_node}",
        f"--time={spec.time}",
        f"--signal=B:USR1@{spec.signal_lead_s}",  # to this shell only; the trap forwards it
        "--requeue",
        "--open-mode=append",  # a requeued job keeps its log
        f"--output={log}",
        f"--error={log}",
        f"--chdir={spec.workdir}",
    ]
    if spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(spec, key) is not None:
            opts.append(f"--{key}={getattr(spec, key)}")
    if spec.is_array:
        opts.append(f"--array={spec.array or f'0-{len(spec.task_overrides) - 1}'}")
    return opts + list(spec.extra_sbatch)


def _task_select(spec: JobSpec) -> str:
    """Bash that points RUN_DIR/EXTRA_ARGS at this array task's settings."""
    if not spec.is_array:
        return "# (not an array job)"
    if not spec.task_overrides:
        return 'RUN_DIR="$RUN_DIR/task-$SLURM_ARRAY_TASK_ID"  # array: one run directory per task'
    lines = ['case "$SLURM_ARRAY_TASK_ID" in  # array: per-task run directory and arguments']
    for i, task in enumerate(spec.task_overrides):
        run_dir = shlex.quote(task.run_dir) if task.run_dir else f'"$RUN_DIR/task-{i}"'
        lines.append(f"    {i}) RUN_DIR={run_dir}; EXTRA_ARGS=({_shell_args(task.args)}) ;;")
    lines.append('    *) echo "bigadapt: no settings for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines)


def _shell_args(args: list[str]) -> str:
    """Quote each argument; RUN_DIR_TOKEN becomes "$RUN_DIR" (expanded per task at run time)."""
    return " ".join(_shell_arg(a) for a in args)


def _shell_arg(arg: str) -> str:
    pieces = arg.split(RUN_DIR_TOKEN)
    quoted = [shlex.quote(p) if p else "" for p in pieces]
    return '"$RUN_DIR"'.join(quoted) or "''"


def _env_exports(spec: JobSpec) -> str:
    env = dict(spec.env)
    if not spec.gpus_per_node:
        env.setdefault("DS_ACCELERATOR", "cpu")
    lines = [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    if _needs_pythonpath() and "PYTHONPATH" not in env:  # so the ranks' `-m bigadapt.slurm_rank` finds this checkout
        lines.append(f'export PYTHONPATH={shlex.quote(str(REPO_ROOT))}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    return "\n".join(lines)


def _needs_pythonpath() -> bool:
    """A source checkout (not an installed package) must be put on the ranks' import path. Only a checkout has
    the project's setup.cfg beside the package (site-packages, a --target folder or a wheel never do)."""
    return (REPO_ROOT / "setup.cfg").is_file()


# --- submitting and watching -------------------------------------------------------------------


def submit(script_path: str | Path, dry_run: bool = False) -> str | None:
    """`sbatch --parsable SCRIPT`; returns the job id. dry_run: `sbatch --test-only`, returns None.

    The controller checks the request either way (partition, limits). Failures raise SlurmError
    with sbatch's stderr verbatim and a hint.
    """
    script = Path(script_path)
    _make_log_dirs(script)  # SLURM does not create them: the job would fail without a trace
    cmd = ["sbatch", "--parsable", *(["--test-only"] if dry_run else []), str(script)]
    proc = _run(cmd)
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}\nhint: {_hint(proc.stderr, script)}")
    if dry_run:
        return None
    return proc.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def job_states(job_id: str) -> list[JobState]:
    """All records `scontrol show job` has for job_id (an array job id gives one per task)."""
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if proc.returncode != 0:
        raise SlurmError(
            f"scontrol show job {job_id} failed: {proc.stderr.strip()}\n"
            "hint: without accounting SLURM forgets a job MinJobAge (default 300 s) after it ends"
        )
    return [_parse_job(line) for line in proc.stdout.splitlines() if line.strip()]


def job_state(job_id: str) -> JobState:
    """The state of one job or array task ("123", "123_4"). Uses scontrol: accounting may be off."""
    states = job_states(job_id)
    for state in states:
        if state.job_id == str(job_id) or state.fields.get("JobId") == str(job_id):
            return state
    return states[0]


def read_events(run_dir: str | Path) -> list[dict[str, str]]:
    """Parsed <run_dir>/logs/events.log: dicts with "time", "event" and the key=value pairs."""
    path = Path(run_dir) / "logs" / "events.log"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        event = {"time": parts[0], "event": parts[1]}
        event.update(p.split("=", 1) for p in parts[2:] if "=" in p)
        events.append(event)
    return events


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(
            f"{cmd[0]}: command not found\nhint: run on a SLURM login node, or start a local "
            "cluster with `sudo slurm/localhost/setup.sh`"
        ) from None


def _make_log_dirs(script: Path) -> None:
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--(?:output|error)=(\S+)", line)
        if m:
            Path(m.group(1)).parent.mkdir(parents=True, exist_ok=True)


_HINTS = [
    ("invalid partition", "list the partitions you may use with `sinfo -s` and set slurm.partition"),
    ("invalid account", "list your accounts with `sacctmgr show assoc user=$USER` and set slurm.account"),
    ("invalid qos", "list QOS names with `sacctmgr show qos` and set slurm.qos"),
    ("time limit", "lower slurm.time below the partition's MaxTime (`sinfo -s`)"),
    (
        "node configuration is not available",
        "ask for fewer nodes/CPUs/GPUs/memory per node than a node has (`sinfo -N -l`)",
    ),
    ("invalid feature", "slurm.constraint names no node feature (`sinfo -o '%N %f'`)"),
    ("unable to contact slurm controller", "slurmctld is down or unreachable (`scontrol ping`)"),
]


def _hint(stderr: str, script: Path) -> str:
    low = stderr.lower()
    for needle, hint in _HINTS:
        if needle in low:
            return hint
    return f"check the #SBATCH lines of {script}; `sbatch --test-only {script}` repeats the check"


def _parse_job(line: str) -> JobState:
    fields = dict(m.groups() for m in re.finditer(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", line))
    job_id = fields.get("JobId", "")
    if fields.get("ArrayTaskId", "").isdigit():
        job_id = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    return JobState(
        job_id=job_id,
        state=fields.get("JobState", "UNKNOWN"),
        reason=fields.get("Reason", ""),
        restarts=int(fields.get("Restarts", "0") or 0),
        exit_code=int(code or 0),
        exit_signal=int(sig or 0),
        fields=fields,
    )
