"""Shared helpers: tiny configs as real YAML files, and real launches (plain python or the deepspeed launcher)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 96, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0,
             "pad_token_id": 0}
TINY_LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 96, "max_position_embeddings": 64,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def pytest_runtest_logreport(report):
    """With BIGADAPT_TEST_TIMES=FILE, every phase's duration is appended there as a JSON line (all workers append to
    one file): .ci/run sums it per test file, so the slowest files are known after every CI run."""
    path = os.environ.get("BIGADAPT_TEST_TIMES")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "when": report.when, "s": round(report.duration, 3)}) + "\n")


def tiny_config(run_dir: Path, arch: dict = TINY_GPT2, **sections) -> dict:
    """A small, fast, learnable run; `sections` override per section, e.g. train={"max_steps": 4}."""
    cfg = {
        "run_dir": str(run_dir),
        "model": {"arch": dict(arch), "objective": "seq_cls"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]},
        "data": {"task": "synthetic_cls", "seq_len": 16, "num_train": 512, "num_eval": 64},
        "train": {"batch_size": 16, "micro_batch": 4, "lr": 2e-3, "max_steps": 8, "log_every": 1},
        "zero": {"param_persistence_threshold": 0},
    }
    for section, values in sections.items():
        cfg[section] = dict(cfg.get(section, {}), **values) if isinstance(values, dict) else values
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def zero3_engine(arch: dict = TINY_GPT2, **sections):
    """For scripts the tests launch on several ranks: a ZeRO-3 engine over the tiny config (of `arch`), every
    tensor partitioned, the method injected (every rank calls this)."""
    from bigadapt import accounting, engine, methods, zero
    from bigadapt import model as base_model
    from bigadapt.config import config_from_dict
    cfg = config_from_dict(tiny_config("unused", arch=arch, zero={"stage": 3, "param_persistence_threshold": 0},
                                       **sections))
    engine.init_distributed()
    accumulation = cfg.train.batch_size // (cfg.train.micro_batch * zero.world_size())
    conf = engine.ds_config(cfg, zero.world_size(), accumulation, accounting.shapes(cfg)[0])
    zero.register_for_loading(conf)
    model = base_model.build_base(cfg.model, 0)
    methods.apply(model, cfg)
    eng, _ = engine.initialize(model, cfg, conf)
    return eng


@pytest.fixture
def bench_launch(monkeypatch):
    """What a user's shell gives a `bigadapt bench` run: the repo as working directory, this venv's deepspeed
    launcher on PATH, the CPU accelerator."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
             PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # the venv's ninja: no JIT rebuilds
    # a launch's own rendezvous: nothing inherited from a process group this process (or its parent) joined
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    # DeepSpeed JIT-builds its CPU comm op into torch's extension cache: one cache per environment, so a second
    # checkout's venv on the same machine cannot rebuild it under this run's ranks
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return e


def run_cli(*args: str, timeout: int = 300, extra_env: dict | None = None, fresh: bool = False,
            **kw) -> subprocess.CompletedProcess:
    """`python -m bigadapt args` in its own process: forked from a server that has the libraries imported
    (tests/cli_fork.py says what that skips), or with fresh=True (or any subprocess option in kw) a new
    interpreter."""
    call_env = dict(env(), **(extra_env or {}))
    if fresh or kw or os.environ.get("BIGADAPT_TEST_FRESH_CLI") == "1":
        return subprocess.run([sys.executable, "-m", "bigadapt", *args], cwd=REPO, env=call_env,
                              capture_output=True, text=True, timeout=timeout, **kw)
    from tests import cli_fork
    return cli_fork.run(list(args), call_env, REPO, timeout, server_env=env())


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, *args: str, script: str = "launch/train.py", timeout: int = 400,
           extra_env: dict | None = None, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """n real ranks on gloo: `torchrun --nproc-per-node n script ...` by default, `deepspeed --num_gpus n script ...`
    with launcher="deepspeed". Both are supported launchers and the ranks run the same code; torchrun is the
    lighter process tree (the deepspeed runner imports DeepSpeed twice before a rank starts and polls its ranks
    once a second: ~5 s a launch on 2 cores), so only the tests about the deepspeed launcher itself use it —
    and CI runs the README's `deepspeed` command verbatim besides."""
    port = str(_free_port())  # the OS's choice: a port derived from the pid can collide with another launch
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(n), "--master_port", port, script, *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(n), "--master-port", port, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=dict(env(), **(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)


def train_each(configs, *args: str) -> int:
    """For a script launched on several ranks: `bigadapt train` on each config in turn in these same processes (the
    launcher and imports paid once; the configs written before the launch, so no rank reads a file another is
    writing), with `args` (e.g. "--resume", "auto") on each. The first nonzero exit code, else 0."""
    from bigadapt.cli import main as cli
    for path in configs:
        rc = cli(["train", "--config", str(path), *args])
        if rc:
            return rc
    return 0


def launch_each(n: int, configs, **kw) -> subprocess.CompletedProcess:
    """One launch of n ranks training every config in turn (tests/distributed/train_each.py)."""
    return launch(n, *map(str, configs), script="tests/distributed/train_each.py", **kw)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    """The run's records, read as bigadapt reads them (a torn last line dropped, with a warning)."""
    from bigadapt import records
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(path)
    return records.read(path, warn=print)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One real single-process training run with two checkpoints, shared by the checkpoint/export tests."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = write_config(run_dir.parent / "cfg.yaml", tiny_config(run_dir, train={"save_every": 4, "keep_last": 3}))
    check(run_cli("train", "--config", str(cfg)))
    return run_dir


@pytest.fixture
def shared_data() -> Path:
    """The offline datasets (../shared/data). Absent on a developer laptop: skip, saying where we looked;
    absent in CI: fail, since CI always has them beside the clone."""
    from bigadapt.data import shared_data_dir
    root = shared_data_dir()
    if not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data not found at {root} in CI", pytrace=False)
        pytest.skip(f"shared data not found at {root} (set BIGADAPT_SHARED_DATA)")
    return root
