"""The user's DeepSpeed JSON (zero.deepspeed_config) merged under bigadapt's keys, and offload in the config
DeepSpeed gets and in the estimate."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bigadapt import accounting, engine
from bigadapt.accounting import Layout
from bigadapt.config import load_config
from bigadapt.errors import ConfigError

from .conftest import REPO, env, run_cli, tiny_config, write_config


def _cfg(tmp: Path, user: dict | str | None = None, *overrides: str):
    sets = list(overrides)
    if user is not None:
        path = tmp / "ds.json"
        path.write_text(user if isinstance(user, str) else json.dumps(user))
        sets.append(f"zero.deepspeed_config={path}")
    return load_config(write_config(tmp / "cfg.yaml", tiny_config(tmp / "run")), sets)


def _conf(cfg, world: int = 2) -> dict:
    return engine.ds_config(cfg, world, cfg.train.batch_size // (cfg.train.micro_batch * world),
                            accounting.shapes(cfg)[0])


def test_passthrough_and_auto_filled(tmp_path):
    user = {"wall_clock_breakdown": True, "comms_logger": {"enabled": True, "verbose": False},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"}, "steps_per_print": 5,
            "zero_optimization": {"stage": "auto", "zero_quantized_weights": True, "reduce_bucket_size": "auto",
                                  "stage3_max_live_parameters": "auto"}}
    plain = _conf(_cfg(tmp_path))
    conf = _conf(_cfg(tmp_path, user))
    assert conf["wall_clock_breakdown"] is True and conf["comms_logger"] == user["comms_logger"]
    assert conf["steps_per_print"] == 5  # a default of bigadapt's, the user's wins
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 2
    assert conf["bf16"] == {"enabled": False}  # fp32 base
    z = conf["zero_optimization"]
    assert z["stage"] == 3 and z["zero_quantized_weights"] is True
    for key in ("reduce_bucket_size", "stage3_max_live_parameters"):
        assert z[key] == plain["zero_optimization"][key]


@pytest.mark.parametrize("user, key, fix", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu", "train.micro_batch"),
    ({"gradient_clipping": 0.5}, "gradient_clipping", "train.clip"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, "optimizer", "train.lr"),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "model.dtype"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "zero.stage"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer.device",
     "zero.offload_optimizer"),
])
def test_conflicting_owned_key_is_one_line(tmp_path, user, key, fix):
    with pytest.raises(ConfigError) as e:
        _conf(_cfg(tmp_path, user, "zero.stage=3"))
    msg = str(e.value)
    assert key in msg and fix in msg and "\n" not in msg


def test_conflict_refused_through_the_cli_before_anything_starts(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "monitor": {}}))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run", zero={
        "param_persistence_threshold": 0, "deepspeed_config": str(tmp_path / "ds.json")}))
    proc = run_cli("train", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "train_micro_batch_size_per_gpu=8" in line and "train.micro_batch" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, says", [(None, "no such file"), ("{not json", "not valid JSON"),
                                        ("[1, 2]", "JSON object"), ('{"scheduler": "auto"}', '"auto"')])
def test_bad_file_is_one_line(tmp_path, text, says):
    if text is not None:
        (tmp_path / "ds.json").write_text(text)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run", zero={
        "param_persistence_threshold": 0, "deepspeed_config": str(tmp_path / "ds.json")}))
    proc = run_cli("estimate", "--config", str(cfg))
    assert proc.returncode == 2 and says in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_persistence_threshold_from_the_json_changes_the_estimate(tmp_path):
    lay = Layout(world=2, stage=3, micro_batch=4, seq_len=16, device="cpu")
    (tmp_path / "a").mkdir()
    shape = accounting.shapes(_cfg(tmp_path / "a", None, "zero.param_persistence_threshold=null"))[0]
    plain = accounting.per_rank(shape, _cfg(tmp_path / "a", None, "zero.param_persistence_threshold=null"), lay)
    mine = _cfg(tmp_path, {"zero_optimization": {"stage3_param_persistence_threshold": 0,
                                                 "reduce_bucket_size": 1000}}, "zero.param_persistence_threshold=null")
    user = accounting.per_rank(shape, mine, lay)
    # DeepSpeed's default keeps every tensor of this tiny model whole (fp32); the user's 0 partitions them all
    assert plain["persistent_copies"] == 4 * shape.total and user["persistent_copies"] == 0
    assert user["reduce_bucket"] == 1000 * 4
    assert _conf(mine)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    with pytest.raises(ConfigError, match="zero.param_persistence_threshold"):  # both set, and differently
        _conf(_cfg(tmp_path, {"zero_optimization": {"stage3_param_persistence_threshold": 7}}))


def test_offload_sections_and_pin_memory(tmp_path):
    cfg = _cfg(tmp_path, {"zero_optimization": {"offload_optimizer": {"buffer_count": 8}}},
               "zero.offload_optimizer=cpu", "zero.offload_param=cpu")
    conf = _conf(cfg)
    z = conf["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False, "buffer_count": 8}  # no GPU here
    assert z["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert conf["zero_force_ds_cpu_optimizer"] is False  # torch AdamW steps the offloaded partitions


@pytest.mark.parametrize("sets, says", [
    (["zero.stage=2", "zero.offload_param=cpu"], "needs ZeRO stage 3"),
    (["zero.stage=0", "zero.offload_optimizer=cpu"], "stage 1, 2 or 3"),
    (["zero.offload_optimizer=nvme"], "zero.nvme_path"),
    (["zero.offload_param=disk"], "none, cpu, nvme"),
    (["zero.nvme_path=/tmp"], "only used with"),
])
def test_offload_refusals_are_config_errors(tmp_path, sets, says):
    with pytest.raises(ConfigError, match=says):
        _cfg(tmp_path, None, *sets)


def test_offload_stage_from_world_size_refused_in_ds_config(tmp_path):
    cfg = _cfg(tmp_path, None, "zero.stage=null", "zero.offload_param=cpu")  # one rank: stage 0
    with pytest.raises(ConfigError, match="stage 3"):
        engine.ds_config(cfg, 1, 4)


def test_estimate_rows_for_offload(tmp_path):
    """GPT-3 175B LoRA on 8 GPUs: optimizer offload takes masters, moments and grads off the GPU; param offload
    the base partition; nvme puts them on disk with pinned swap buffers in host RAM."""
    lay = Layout(world=8, stage=3, micro_batch=1, seq_len=2048)
    base = REPO / "configs" / "gpt3-175b-lora.yaml"
    rows = {}
    for name, sets in {"none": [], "opt": ["zero.offload_optimizer=cpu"],
                       "param": ["zero.offload_optimizer=cpu", "zero.offload_param=cpu"],
                       "nvme": ["zero.offload_optimizer=nvme", "zero.offload_param=nvme", "zero.nvme_path=/nvme"]
                       }.items():
        cfg = load_config(base, ["zero.stage=3", "zero.offload_optimizer=none", "zero.offload_param=none",
                                 "zero.nvme_path=null", *sets])
        rows[name] = accounting.per_rank(accounting.shapes(cfg)[0], cfg, lay)
    n, o, p, v = rows["none"], rows["opt"], rows["param"], rows["nvme"]
    assert n["offload_host_ram"] == n["offload_nvme"] == 0
    assert o["offload_host_ram"] == o["fp32_masters"] + o["optimizer_states"] + o["gradients"]
    assert o["total"] == n["total"] - n["optimizer_step"] - o["offload_host_ram"] + (o["gradients"] - n["gradients"])
    assert p["total"] == o["total"] - n["base_partition"] - n["trainable_working"]
    assert p["total"] < n["total"] - 40 * 2**30  # a bf16 175B base over 8 ranks: ~41 GiB leaves each GPU
    assert v["offload_nvme"] == v["fp32_masters"] + v["optimizer_states"] + v["base_partition"] + \
        v["trainable_working"] and v["offload_swap_buffers"] > 0
    assert v["total"] == p["total"]  # the GPU holds the same; the host holds buffers instead of states


def test_passthrough_reaches_the_engine(tmp_path):
    """A real (one-rank) DeepSpeed engine built from the merged config sees the user's keys."""
    (tmp_path / "ds.json").write_text(json.dumps({"wall_clock_breakdown": True, "comms_logger": {"enabled": True},
                                                  "zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    script = textwrap.dedent(f"""
        from bigadapt import accounting, engine, methods, zero
        from bigadapt import model as base_model
        from bigadapt.config import config_from_dict
        from tests.conftest import tiny_config
        cfg = config_from_dict(tiny_config("unused", zero={{"stage": 3, "param_persistence_threshold": None,
                                                             "deepspeed_config": {str(tmp_path / 'ds.json')!r}}}))
        engine.init_distributed()
        conf = engine.ds_config(cfg, 1, 4, accounting.shapes(cfg)[0])
        zero.register_for_loading(conf)
        model = base_model.build_base(cfg.model, 0)
        methods.apply(model, cfg)
        eng, _ = engine.initialize(model, cfg, conf)
        print("RESULT", eng.wall_clock_breakdown(), eng._config.comms_config.comms_logger_enabled,
              eng._config.zero_config.param_persistence_threshold)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT True True 0" in proc.stdout, proc.stdout[-2000:]
