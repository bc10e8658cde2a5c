"""Single-GPU checks (`pytest -m gpu`): skipped without CUDA, so CI (CPU) never runs them.

Run on a GPU machine with `python -m pytest -m gpu tests/gpu -v`. What they check: LoRA numerics in bf16 on the
GPU against an fp32 CPU reference, merge on the GPU, a real one-GPU ZeRO-3 launch in bf16 whose model-state
bytes equal the prediction and whose peak allocated memory is within 15% of it, and a QLoRA NF4 base on CUDA.
"""
from __future__ import annotations

import json

import pytest
import torch

from bigadapt import methods
from bigadapt import model as base_model
from bigadapt.config import config_from_dict
from bigadapt.methods.lora import LoRA
from tests.conftest import TINY_GPT2, check, launch, metrics, tiny_config, write_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU_ENV = {"DS_ACCELERATOR": "cuda"}


def test_lora_bf16_on_gpu_matches_fp32_reference():
    """bf16 frozen base on the GPU, fp32 LoRA (as bigadapt trains it) against a plain fp32 CPU computation."""
    torch.manual_seed(0)
    lora = LoRA(torch.nn.Linear(256, 384), r=8, alpha=16)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.05)  # B = 0 at init would hide the adapter
    W, b = lora.base_layer.weight.detach().clone(), lora.base_layer.bias.detach().clone()
    A, B = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    x = torch.randn(4, 32, 256)
    ref = x @ W.T + b + 2.0 * (x @ A.T) @ B.T
    lora = lora.cuda()
    lora.base_layer.requires_grad_(False).to(torch.bfloat16)
    y = lora(x.cuda().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float().cpu(), ref, atol=5e-2, rtol=3e-2)
    y.float().pow(2).mean().backward()
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None and lora.base_layer.weight.grad is None


def test_merge_on_gpu_equals_unmerged():
    cfg = config_from_dict(tiny_config("unused", model={"dtype": "bf16"}))
    model = base_model.build_base(cfg.model, 0)
    methods.apply(model, cfg)
    model = model.cuda().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(1, TINY_GPT2["vocab_size"], (2, 16), device="cuda")
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        for m in model.modules():
            if isinstance(m, LoRA):
                m.merge()
        after = model(input_ids=ids).logits.float()
    assert torch.allclose(before, after, atol=5e-2, rtol=5e-2)  # bf16 weights absorb the delta with rounding


def _gpu_run(tmp_path, arch: dict, steps: int, seq_len: int = 64, lr: float = 2e-3) -> tuple:
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, arch=arch, model={"dtype": "bf16"},
                      train={"max_steps": steps, "batch_size": 16, "micro_batch": 16, "log_every": 1, "lr": lr},
                      data={"task": "synthetic_cls", "seq_len": seq_len, "num_train": 512, "num_eval": 64},
                      zero={"stage": 3, "param_persistence_threshold": 0})
    proc = check(launch(1, "--config", str(write_config(tmp_path / "gpu.yaml", cfg)), extra_env=GPU_ENV))
    return run_dir, json.loads((run_dir / "accounting.json").read_text()), proc


def test_one_gpu_zero3_bf16_run_trains_and_matches_the_prediction(tmp_path):
    # the majority vote over 64 tokens does not move in 30 steps at lr 2e-3 (the same run in bf16 on CPU: the last
    # loss above the first, eval at chance); over 16 tokens at 1e-2 the mean of the last 10 of 100 losses was 0.58x
    # the first 10's (eval accuracy 0.72), so 0.8x leaves room for the GPU's other rounding
    run_dir, report, _ = _gpu_run(tmp_path, TINY_GPT2, steps=100, seq_len=16, lr=1e-2)
    losses = [m["loss"] for m in metrics(run_dir) if "loss" in m]
    assert len(losses) == 100 and sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert report["model_states_max_rel_error"] <= 0.02


def test_peak_allocated_within_15_percent_on_a_model_where_states_dominate(tmp_path):
    """~100M-parameter GPT-2 shape: model states and gather buffers dominate, as in the real use."""
    arch = dict(TINY_GPT2, n_layer=8, n_embd=1024, n_head=16, vocab_size=50257, n_positions=128)
    _, report, _ = _gpu_run(tmp_path, arch, steps=3)
    predicted = report["predicted"]["total"] - report["predicted"]["framework_overhead"]
    measured = report["measured"][0]["peak_memory"]
    assert abs(measured - predicted) / predicted <= 0.15, (measured, predicted)


def test_qlora_nf4_on_gpu_tracks_the_full_precision_adapter(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig, AutoModelForSequenceClassification
    fields = dict(TINY_GPT2)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, num_labels=2)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "base")
    outs = {}
    for quant in ("none", "nf4"):
        cfg = config_from_dict({"model": {"name_or_path": str(tmp_path / "base"), "quantization": quant},
                                "method": {"name": "qlora" if quant != "none" else "lora", "r": 4,
                                           "targets": ["q", "v"]}})
        model = base_model.build_base(cfg.model, seed=0)
        torch.manual_seed(1)
        methods.apply(model, cfg)
        model = model.cuda().eval()
        ids = torch.randint(2, 96, (3, 12), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            outs[quant] = model(input_ids=ids).logits.float().cpu()
    rel = (outs["nf4"] - outs["none"]).abs().max() / outs["none"].abs().max()
    assert rel < 0.25  # CPU measured 0.058 for nf4 on this base
