"""Config: YAML + overrides -> typed config; every mistake is one line naming the key, exit code 2 via the CLI."""
from __future__ import annotations

import pytest

from bigadapt.config import EMBEDDED_DEFAULT, check_world, load_config
from bigadapt.errors import ConfigError

from .conftest import REPO, run_cli, tiny_config, write_config


def test_embedded_default_and_its_yaml_copy_agree():
    assert load_config(None) == load_config(REPO / "configs" / "tiny-gpt2-lora.yaml")
    assert load_config(None).model.arch == EMBEDDED_DEFAULT["model"]["arch"]


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["train.lr=2e-4", "method.targets=[q,k,v]", "zero.stage=3", "model.dtype=bf16"])
    assert cfg.train.lr == 2e-4 and cfg.method.targets == ["q", "k", "v"] and cfg.zero.stage == 3
    assert cfg.model.dtype == "bf16"
    assert load_config(None, ["method.alpha=8"]).method.alpha == 8.0  # an int is a fine float


@pytest.mark.parametrize("override,needle", [
    ("method.r=0", "method.r=0"), ("method.alpha=-1", "method.alpha"), ("zero.stage=4", "zero.stage=4"),
    ("train.micro_batch=0", "train.micro_batch"), ("train.lrr=1", "train.lrr: unknown key"),
    ("train.lr=fast", "train.lr: expected float"), ("method.name=loar", "unknown method"),
    ("data.task=nope", "unknown task"), ("train.batch_size=30", "multiple of train.micro_batch"),
    ("model.dtype=int8", "model.dtype"), ("method.dropout=1.5", "method.dropout"), ("bogus=1", "bogus: unknown key"),
    ("method.targets=q", "expected a list"), ("train", "expected KEY=VALUE"),
])
def test_bad_values(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_world_size_must_divide_the_global_batch():
    cfg = load_config(None, ["train.batch_size=48", "train.micro_batch=16"])
    assert check_world(cfg, 1) == 3
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_world(cfg, 2)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("args,needle", [
    (["--set", "method.r=0"], "method.r=0"),
    (["--set", "method.alpha=0"], "method.alpha=0.0"),
    (["--set", "zero.stage=5"], "zero.stage=5"),
    (["--set", "train.micro_batch=-2"], "train.micro_batch=-2"),
    (["--set", "train.lerning_rate=1"], "train.lerning_rate: unknown key"),
    (["--set", "method.r=two"], "method.r: expected int"),
    (["--set", "method.targets=[ffn_gate]"], "gpt2 has no 'ffn_gate'"),
    (["--set", "method.targets=[c_attnn]"], "'c_attnn' matches no module"),
    (["--set", "model.name_or_path=org/not-downloadable", "--set", "model.arch={}"], "cannot be resolved"),
    (["--config", "nope.yaml"], "no such file"),
])
def test_cli_user_errors_exit_2_with_one_line_and_create_nothing(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "--set", f"run_dir={run_dir}", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("bigadapt: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()  # raised before any process group or file


def test_launcher_user_error_exits_2(tmp_path):
    from .conftest import launch
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", method={"r": -1}))
    # the README's launcher passes the ranks' exit code on (torchrun reports any failure as 1)
    proc = launch(2, "--config", str(cfg), timeout=120, launcher="deepspeed")
    assert proc.returncode == 2
    assert proc.stderr.count("bigadapt: error: method.r=-1") + proc.stdout.count("bigadapt: error: method.r=-1") == 1


def test_a_rank_other_than_0_names_itself_in_errors_only_it_may_have(tmp_path, monkeypatch, capsys):
    from bigadapt import cli
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["eval", str(tmp_path / "no-run")]) == 2  # a checkpoint this rank cannot see
    err = capsys.readouterr().err
    assert err.startswith("bigadapt: error (rank 1): ") and "no-run" in err and err.count("\n") == 1
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2  # config errors: rank 0 says them
    assert capsys.readouterr().err == ""
