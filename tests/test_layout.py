"""zero.stage auto (bigadapt/layout.py): which layout the accounting picks for given budgets and world sizes, on
real shapes built on the meta device; ZeRO-3 gather windows sized from the memory left; the coalescing guard."""
from __future__ import annotations

import json
import types

import pytest
import torch

from bigadapt import accounting, engine, layout, zero
from bigadapt.accounting import DS_WINDOWS, GIB, Layout, model_states
from bigadapt.config import config_from_dict, load_config
from bigadapt.errors import ConfigError

from .conftest import REPO, run_cli, tiny_config

LLAMA_7B = REPO / "configs" / "llama-7b-lora.yaml"
GPT3 = REPO / "configs" / "gpt3-175b-lora.yaml"
DEEP_GPT2 = {"model_type": "gpt2", "n_layer": 8, "n_embd": 64, "n_head": 4, "vocab_size": 96, "n_positions": 64}


@pytest.fixture(scope="module")
def llama():
    cfg = load_config(LLAMA_7B, ["zero.stage=auto"])
    return cfg, accounting.shapes(cfg)[0]


def _lay(cfg, world: int) -> Layout:
    return Layout(world, 3, cfg.train.micro_batch, cfg.data.seq_len, cfg.train.activation_checkpointing,
                  checkpoint_every=cfg.train.checkpoint_every)


def _totals(shape, cfg, lay) -> dict:
    return {s: accounting.per_rank(shape, cfg, Layout(**dict(vars(lay), stage=s)))["total"] for s in (0, 1, 2, 3)}


def test_config_default_is_auto_and_bad_values_are_one_line():
    assert config_from_dict(tiny_config("r")).zero.stage == "auto"
    cfg = load_config(None, ["zero.stage=auto", "zero.memory_budget=70GiB"])
    assert layout.configured_budget(cfg.zero) == 70 * GIB
    assert layout.configured_budget(load_config(None, ["zero.memory_budget=123456"]).zero) == 123456
    for bad, needle in (("zero.stage=fast", "zero.stage='fast'"),
                        ("zero.stage=true", "zero.stage: expected int or str"),
                        ("zero.memory_budget=lots", "zero.memory_budget='lots'"),
                        ("zero.memory_budget=0", "zero.memory_budget=0")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [bad])
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_llama_7b_picks_replicated_then_partitioned_then_refuses(llama):
    cfg, shape = llama
    lay = _lay(cfg, 8)
    t = _totals(shape, cfg, lay)
    assert t[3] < t[2] <= t[1]  # partitioning the base saves memory; stage 1 keeps whole gradients
    roomy = layout.choose(cfg, lay, shape, 80 * GIB, "test")
    assert roomy.stage == 2 and roomy.windows is None and "stage 3 would add gathers" in roomy.reason
    assert roomy.predicted == {2: t[2]}  # the fastest that fits is taken without predicting the rest
    tight = layout.choose(cfg, lay, shape, t[2] - 1, "test")  # one byte short of the replicated base
    assert tight.stage == 3 and set(tight.predicted) == {1, 2, 3} and tight.predicted[3] <= t[2] - 1
    with pytest.raises(ConfigError) as e:
        layout.choose(cfg, lay, shape, t[3] - 1, "test")
    msg = str(e.value)
    assert msg.startswith("zero.memory_budget=") and "no ZeRO layout fits on 8 rank(s)" in msg and "\n" not in msg
    assert "train.micro_batch" in msg and "zero.offload_optimizer" in msg


def test_one_rank_takes_stage_0(llama):
    cfg, shape = llama
    lay = _lay(cfg, 1)
    t = _totals(shape, cfg, lay)
    assert layout.choose(cfg, lay, shape, t[0], "test").stage == 0
    with pytest.raises(ConfigError, match="no ZeRO layout fits on 1 rank"):
        layout.choose(cfg, lay, shape, t[0] - 1, "test")
    # optimizer offload, which stage 0 refuses: stage 2 keeps the base whole on the one rank
    off = layout.with_zero(cfg, offload_optimizer="cpu")
    assert layout.choose(off, lay, shape, 80 * GIB, "test").stage == 2


def test_gpt3_175b_is_partitioned_and_names_the_fewest_ranks():
    cfg = load_config(GPT3, ["zero.stage=auto"])
    shape = accounting.shapes(cfg)[0]
    lay = _lay(cfg, 96)
    choice = layout.choose(cfg, lay, shape, 80 * GIB, "test")
    assert choice.stage == 3 and choice.predicted[2] > 300 * GIB  # 175B bf16 cannot be replicated
    assert choice.windows == DS_WINDOWS  # memory to spare: DeepSpeed's own windows, never wider
    few = accounting.fewest_ranks(shape, cfg, Layout(**dict(vars(lay), stage=3)), 80 * GIB)
    with pytest.raises(ConfigError, match=f"use at least {few} ranks"):
        layout.choose(cfg, _lay(cfg, few - 1), shape, 80 * GIB, "test")


def test_windows_grow_with_the_memory_left_within_deepspeeds_defaults(llama):
    cfg, shape = llama
    cfg = layout.with_zero(cfg, stage=3)
    lay = _lay(cfg, 8)
    one_block = accounting.gather_windows(shape, cfg.zero)
    least = accounting.per_rank(shape, cfg, Layout(**dict(vars(lay), stage=3)))["total"]
    assert layout.stage3_windows(shape, cfg, lay, least - 1)[0] is None  # nothing left: one-block windows
    assert layout.stage3_windows(shape, cfg, lay, None)[0] is None  # no budget known: today's windows
    assert layout.stage3_windows(shape, cfg, lay, least)[0] == one_block  # exactly full: never below one block
    lives = []
    keep = 1 - layout.WINDOW_HEADROOM  # the windows fill this share of the budget, never all of it
    for extra in (GIB // 8, GIB // 2, 40 * GIB):  # a block is ~0.4 GiB in bf16
        budget = int((least + extra) / keep) + 1
        windows, total = layout.stage3_windows(shape, cfg, lay, budget)
        assert total <= keep * budget and all(one_block[k] <= windows[k] <= DS_WINDOWS[k] for k in windows)
        lives.append(windows["max_live_parameters"])
    assert lives[0] < lives[1] < lives[2] == DS_WINDOWS["max_live_parameters"]
    fixed = layout.with_zero(cfg, max_live_parameters=12345)  # an explicit window always wins
    assert layout.stage3_windows(shape, fixed, lay, least + 2 * GIB)[0]["max_live_parameters"] == 12345
    # and the run's DeepSpeed config carries what was chosen (for this machine: CPU ranks here)
    roomy = int((least + GIB // 2) / keep) + 1
    auto = layout.with_zero(llama[0], memory_budget=roomy, stage=3)
    z = engine.ds_config(auto, 8, 1, shape)["zero_optimization"]
    here = layout.stage3_windows(shape, cfg, layout.run_layout(cfg, 8), roomy)[0]
    assert z["stage3_max_live_parameters"] == here["max_live_parameters"] > one_block["max_live_parameters"]


def test_without_a_budget_auto_keeps_the_fixed_rule_and_explicit_stages_are_obeyed(llama, monkeypatch):
    cfg, shape = llama
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for world, stage in ((1, 0), (2, 3)):
        choice = layout.choose(cfg, _lay(cfg, world), shape)
        assert choice.stage == stage and choice.budget is None and "no memory budget known" in choice.reason
    null = layout.choose(layout.with_zero(cfg, stage=None), _lay(cfg, 2), shape, 10 * GIB, "test")
    assert null.stage == 3 and null.reason.startswith("zero.stage null -> 3")
    over = layout.choose(layout.with_zero(cfg, stage=2), _lay(cfg, 8), shape, 10 * GIB, "test")
    assert over.stage == 2 and "expect out-of-memory" in over.reason  # said, not refused: the user's choice


def test_budget_read_from_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=80 * GIB, name="H100"))
    cfg = load_config(None, ["zero.stage=auto"])
    assert layout.memory_budget(cfg) == (80 * GIB, "the GPU's memory (H100)")
    assert layout.memory_budget(layout.with_zero(cfg, memory_budget="12GiB"))[0] == 12 * GIB  # the config wins


def test_tiny_gpt2_on_cpu_ranks(tmp_path):
    """The same choice on the tiny model the 2-rank test trains (CPU ranks: the host is the device)."""
    cfg = config_from_dict(tiny_config(tmp_path, arch=DEEP_GPT2))
    shape = accounting.shapes(cfg)[0]
    lay = layout.run_layout(cfg, 2)
    t = _totals(shape, cfg, Layout(**dict(vars(lay))))
    assert layout.choose(cfg, lay, shape, t[2], "t").stage == 2
    assert layout.choose(cfg, lay, shape, t[2] - 1, "t").stage == 3


def test_stages_1_and_2_replicate_the_base_by_hand():
    cfg = load_config(None, ["zero.param_persistence_threshold=0", "model.dtype=bf16"])
    ts = [("w", 10, False, 2), ("lora_A", 6, True, 2), ("head.bias", 3, True, 1)]
    for stage in (1, 2):
        d, _ = model_states(ts, cfg, Layout(world=2, stage=stage))
        assert d["base_partition"] == 10 * 2 and d["trainable_working"] == 9 * 2  # whole, bf16
        assert d["fp32_masters"] == (3 + 2) * 4 and d["optimizer_states"] == 2 * (3 + 2) * 4  # partitioned
        assert d["gradients"] == (9 if stage == 1 else 3 + 2) * 2


def test_nothing_fits_is_refused_before_anything_is_written(tmp_path):
    from bigadapt import train
    cfg = config_from_dict(tiny_config(tmp_path / "run", zero={"memory_budget": 1000}))
    with pytest.raises(ConfigError, match=r"^zero.memory_budget=0.0 GiB: with zero.stage auto no ZeRO layout fits"):
        train.run(cfg)
    assert not (tmp_path / "run").exists()


def test_estimate_cli_shows_the_choice():
    proc = run_cli("estimate", "--config", str(LLAMA_7B), "--set", "zero.stage=auto", "--gpu-memory", "80GiB",
                   "--world", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)
    assert est["zero_stage"]["stage"] == est["layout"]["stage"] == 2 and est["layout"]["world"] == 8
    assert est["zero_stage"]["budget_from"] == "--gpu-memory"


def test_coalescing_only_on_a_verified_deepspeed(monkeypatch):
    """Fails when the installed DeepSpeed is not one the wrapped private method was checked on, or has changed
    it: then look at Stage3._post_step, and add the release to COALESCE_VERIFIED (or drop the coalescing)."""
    import deepspeed
    assert zero.post_step_contract() is None
    assert deepspeed.__version__ in zero.COALESCE_VERIFIED, (
        f"DeepSpeed {deepspeed.__version__}: check that coalesce_persistent_gather still holds, then add it")
    opt = types.SimpleNamespace(persistent_parameters=[object()], _post_step=lambda *a: None)
    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    before = opt._post_step
    assert zero.coalesce_persistent_gather(opt) is False and opt._post_step is before


def test_a_resume_on_another_world_size_decides_again_and_is_not_refused(tmp_path):
    """The manifest keeps the config the run used (stage resolved); a resume on 1 rank resolves to stage 0, which
    rundir accepts (zero.* is free to change) and records."""
    from bigadapt import rundir
    cfg = config_from_dict(tiny_config(tmp_path / "run", arch=DEEP_GPT2, zero={"memory_budget": "64GiB"}))
    shape = accounting.shapes(cfg)[0]
    on2, _ = layout.resolve(cfg, layout.run_layout(cfg, 2), shape)
    on1, _ = layout.resolve(cfg, layout.run_layout(cfg, 1), shape)
    assert (cfg.zero.stage, on2.zero.stage, on1.zero.stage) == ("auto", 2, 0)
    changes = rundir.check_resume_config(tmp_path, {"config": on2.to_dict()}, on1, [])
    assert changes == {"zero.stage": (2, 0)}
