"""Activation checkpointing and the attention implementation in one process: the config keys and their refusals,
gradients equal to the run without checkpointing (dropout replayed), every k-th block, the estimate's terms.
The ZeRO-3 runs on 2 ranks are in tests/distributed/test_recompute.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bigadapt import accounting, methods, recompute, targets
from bigadapt import model as base_model
from bigadapt.accounting import Layout
from bigadapt.config import config_from_dict
from bigadapt.errors import ConfigError

from .conftest import TINY_GPT2, run_cli, tiny_config, write_config

DROPOUT = dict(TINY_GPT2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def cfg_of(tmp_path, arch=DROPOUT, **train):
    return config_from_dict(tiny_config(tmp_path / "run", arch=arch, train=train,
                                        method={"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"],
                                                "dropout": 0.1}))


def grads(cfg, wrap: bool = False) -> tuple[dict, float, list[int]]:
    """Gradients of the trainable tensors after one training forward/backward with dropout, and the number of
    times the first block's attention ran (2 = recomputed in backward)."""
    model = base_model.build_base(cfg.model, 0)
    methods.apply_seeded(model, cfg)
    chosen = recompute.enable(model, cfg.train, stage=0, wrap=wrap)
    _, blocks = targets.layer_list(model)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (4, 16), generator=g)
    torch.manual_seed(123)  # the dropout masks
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 1, 0])).loss
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert chosen == [i for i, c in enumerate(calls) if c == 2]  # exactly the chosen blocks were recomputed
    return out, loss.item(), chosen


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("wrap", [False, True], ids=["transformers", "own-wrapper"])
def test_gradients_equal_with_dropout(tmp_path, reentrant, wrap):
    ref, ref_loss, none = grads(cfg_of(tmp_path))
    assert none == []
    got, loss, chosen = grads(cfg_of(tmp_path, activation_checkpointing=True, checkpoint_reentrant=reentrant), wrap)
    assert chosen == [0, 1]
    assert loss == ref_loss
    assert got.keys() == ref.keys() and any("lora_A" in n for n in got)  # LoRA inside the blocks gets gradients
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("wrap", [False, True], ids=["transformers", "own-wrapper"])
def test_every_kth_block(tmp_path, wrap):
    arch = dict(DROPOUT, n_layer=5)
    ref, _, _ = grads(cfg_of(tmp_path, arch=arch))
    got, _, chosen = grads(cfg_of(tmp_path, arch=arch, activation_checkpointing=True, checkpoint_every=2), wrap)
    assert chosen == [0, 2, 4]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-9, msg=name)


def test_off_changes_nothing(tmp_path):
    model = base_model.build_base(cfg_of(tmp_path).model, 0)
    assert recompute.enable(model, cfg_of(tmp_path).train, stage=3) == []
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("train, message", [
    ({"checkpoint_every": 0, "activation_checkpointing": True}, "train.checkpoint_every=0"),
    ({"checkpoint_every": 2}, "only used with train.activation_checkpointing=true"),
    ({"checkpoint_reentrant": True}, "only used with train.activation_checkpointing=true"),
])
def test_config_refusals(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        cfg_of(tmp_path, **train)


def test_attn_implementation_validated_and_passed(tmp_path):
    raw = tiny_config(tmp_path / "run", model={"arch": TINY_GPT2, "objective": "seq_cls",
                                               "attn_implementation": "math"})
    with pytest.raises(ConfigError, match="model.attn_implementation='math': use one of eager, sdpa"):
        config_from_dict(raw)
    for impl in ("eager", "sdpa"):
        raw["model"]["attn_implementation"] = impl
        model = base_model.build_base(config_from_dict(raw).model, 0)
        assert model.config._attn_implementation == impl


def _tcfg(reentrant):
    return SimpleNamespace(activation_checkpointing=True, checkpoint_reentrant=reentrant, checkpoint_every=1)


def test_reentrant_choice(monkeypatch):
    assert recompute.zero3_recompute_safe()  # the DeepSpeed this project pins has PR 8148
    assert recompute.reentrant(_tcfg(None), 3) is False
    assert recompute.reentrant(_tcfg(True), 3) is True
    monkeypatch.setattr(recompute, "zero3_recompute_safe", lambda: False)  # an older DeepSpeed
    assert recompute.reentrant(_tcfg(None), 3) is True  # automatic: the form that runs
    assert recompute.reentrant(_tcfg(None), 0) is False  # no ZeRO-3, no crash
    with pytest.raises(ConfigError, match="train.checkpoint_reentrant=false: ZeRO-3 with DeepSpeed .* crashes"):
        recompute.reentrant(_tcfg(False), 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_flash_attention_refused_in_one_line(tmp_path):
    raw = tiny_config(tmp_path / "run", model={"arch": TINY_GPT2, "objective": "seq_cls",
                                               "attn_implementation": "flash_attention_2"})
    proc = run_cli("train", "--config", str(write_config(tmp_path / "cfg.yaml", raw)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "model.attn_implementation=flash_attention_2: needs a CUDA GPU" in lines[-1], proc.stderr
    assert not (tmp_path / "run").exists()
    # the estimate does not need the GPU: it is made for the cluster
    proc = run_cli("estimate", "--config", str(tmp_path / "cfg.yaml"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["attn_implementation"] == "flash_attention_2"


def test_activation_terms(tmp_path):
    """eager keeps the b*h*s^2 probabilities; checkpointing keeps each block's input plus one block; every k-th
    block lies in between."""
    cfg = cfg_of(tmp_path)
    shape, _ = accounting.shapes(cfg)
    assert accounting.attention(shape, cfg) == "sdpa"  # transformers' choice here
    lay = Layout(world=1, stage=0, micro_batch=4, seq_len=64)

    def act(**kw):
        return accounting.activations(shape, cfg, Layout(**dict(vars(lay), **kw)))["activations"]

    c = shape.config
    s, b, h, a, L = 64, 4, c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    sdpa = act()
    cfg.model.attn_implementation = "eager"
    # fp32: eager keeps the softmax (a*s per token) where SDPA keeps a logsumexp (a per token), per layer
    assert act() - sdpa == pytest.approx(L * a * (s - 1) * s * b * 4, abs=L)
    cfg.model.attn_implementation = None
    per_layer = sdpa / L
    assert act(activation_checkpointing=True) == L * s * b * h * 4 + per_layer
    # L=2, every 2nd: block 0 keeps its input, block 1 everything; block 0's recompute comes after block 1 is freed
    assert act(activation_checkpointing=True, checkpoint_every=2) == s * b * h * 4 + per_layer
    cfg.model.arch["n_layer"] = 5
    shape, _ = accounting.shapes(cfg)
    # L=5, every 2nd: inputs of 0, 2, 4; peak while recomputing 4: blocks 1 and 3 held, 4 recomputed
    assert act(activation_checkpointing=True, checkpoint_every=2) == 3 * s * b * h * 4 + 3 * per_layer


def test_estimate_reads_the_runs_key(tmp_path):
    raw = tiny_config(tmp_path / "run", train={"activation_checkpointing": True, "checkpoint_every": 2})
    path = write_config(tmp_path / "cfg.yaml", raw)

    def estimate(*flags):
        proc = run_cli("estimate", "--config", str(path), "--json", *flags)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    on, off = estimate(), estimate("--no-activation-checkpointing")
    assert on["layout"]["activation_checkpointing"] and on["layout"]["checkpoint_every"] == 2
    assert not off["layout"]["activation_checkpointing"]
    assert on["method"]["per_rank"]["activations"] < off["method"]["per_rank"]["activations"]
    proc = run_cli("estimate", "--config", str(path))
    assert "modelled only" not in proc.stdout and "activation checkpointing every 2 blocks" in proc.stdout
