"""Accounting: exact counts on the meta device, the byte model by hand, GPT-3 175B on a laptop, CLI errors."""
from __future__ import annotations

import json

import pytest

from bigadapt import accounting
from bigadapt.accounting import GIB, Layout, model_states
from bigadapt.config import load_config

from .conftest import REPO, run_cli

GPT3_LORA = REPO / "configs" / "gpt3-175b-lora.yaml"


def test_model_states_by_hand():
    cfg = load_config(None, ["zero.param_persistence_threshold=0"])  # fp32 base
    ts = [("w", 10, False, 2), ("lora_A", 6, True, 2), ("head.bias", 3, True, 1)]
    d, step = model_states(ts, cfg, Layout(world=2, stage=3))
    # partitions on 2 ranks: w 5, lora_A 3, bias 2 (ceil); 4 bytes each in fp32
    assert d["base_partition"] == 5 * 4
    assert d["trainable_working"] == d["fp32_masters"] == d["gradients"] == (3 + 2) * 4
    assert d["optimizer_states"] == 2 * (3 + 2) * 4
    assert d["reduce_bucket"] == 9 * 4  # capped at the trainable count, not DeepSpeed's 5e8
    assert d["persistent_copies"] == 0
    assert step == 3 * 4  # the larger AdamW sub-group's partitions (lora_A) in fp32, inside step() only
    cfg = load_config(None, ["zero.param_persistence_threshold=5", "model.dtype=bf16"])
    d, _ = model_states(ts, cfg, Layout(world=2, stage=3))
    assert d["persistent_copies"] == 3 * 2  # only head.bias (3 <= 5) stays whole, in bf16
    assert d["base_partition"] == 5 * 2 and d["fp32_masters"] == 5 * 4
    d, step = model_states(ts, cfg, Layout(world=1, stage=0))
    assert d["base_partition"] == 10 * 2 and d["optimizer_states"] == 2 * 9 * 4


def test_gpt3_175b_lora_counts_and_storage():
    cfg = load_config(GPT3_LORA)
    est = accounting.estimate(cfg, Layout(world=96, stage=3, seq_len=2048, activation_checkpointing=True),
                              gpu_memory=80 * GIB, fit=True)
    m, f = est["method"], est["full_finetune"]
    assert m["trainable"] == 18_874_368  # 2 x 96 layers x 2 matrices x 12288 x 4
    assert m["storage"]["adapter_fp16"] == 37_748_736  # the paper's "35MB" (37.7 MB = 36.0 MiB)
    assert f["trainable"] == f["params_total"] > 174e9
    assert m["storage"]["n_tasks_adapters"] < 360e9 and m["storage"]["n_tasks_full_copies"] > 34e12  # 354 GB vs 35 TB
    assert m["per_rank"]["model_states"] < f["per_rank"]["model_states"] / 8
    assert m["fewest_ranks"] < f["fewest_ranks"]
    for entry in (m, f):  # the answers are consistent with the model they come from
        few = entry["fewest_ranks"]
        shape = accounting.shapes(cfg)[0 if entry is m else 1]
        lay = Layout(world=few, stage=3, seq_len=2048, activation_checkpointing=True)
        assert accounting.per_rank(shape, cfg, lay)["total"] <= 80 * GIB
        lay.world = few - 1
        assert accounting.per_rank(shape, cfg, lay)["total"] > 80 * GIB
    assert m["largest_micro_batch"] >= f["largest_micro_batch"] >= 1


def test_estimate_cli_json_and_errors():
    proc = run_cli("estimate", "--config", str(GPT3_LORA), "--nodes", "12", "--gpu-memory", "80GB", "--json")
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)
    assert est["method"]["trainable"] == 18_874_368 and est["layout"]["world"] == 96
    bad = run_cli("estimate", "--config", str(GPT3_LORA), "--gpu-memory", "80 parsecs")
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr
    offline = run_cli("estimate", "--set", "model.name_or_path=meta-llama/Llama-2-70b-hf", "--set", "model.arch={}")
    assert offline.returncode == 2 and "local directory" in offline.stderr and "Traceback" not in offline.stderr


@pytest.mark.parametrize("method_overrides", [[], ["method.targets=[q,k,v,o]", "method.r=2"]])
def test_lora_prediction_needs_no_weights(method_overrides):
    cfg = load_config(None, method_overrides)
    shape, full = accounting.shapes(cfg)
    assert sum(n for _, n, t, _ in shape.tensors if t) < sum(n for _, n, t, _ in full.tensors if t)


def test_gather_windows_sized_from_the_model_and_capped_at_deepspeeds():
    ts = [("wte", 300, False, 2), ("h.0.w", 100, False, 2), ("h.1.w", 100, False, 2)]
    shape = accounting.Shape(ts, None, largest_block=120, total=500)
    cfg = load_config(None, [])
    assert accounting.gather_windows(shape, cfg.zero) == {  # the embedding is the largest unit here
        "prefetch_bucket_size": 300, "max_live_parameters": 600, "max_reuse_distance": 300}
    assert accounting.gather_buffers(shape, cfg, Layout(world=2, stage=3)) == 500 * 4  # capped by the model
    cfg = load_config(None, ["zero.max_live_parameters=50"])  # an explicit window is taken as given
    assert accounting.gather_windows(shape, cfg.zero)["max_live_parameters"] == 50
    assert accounting.gather_buffers(shape, cfg, Layout(world=2, stage=3)) == (50 + 300) * 4
    assert accounting.gather_buffers(shape, cfg, Layout(world=2, stage=0)) == 0
    big = accounting.shapes(load_config(GPT3_LORA))[0]  # a 1.8B-element block: DeepSpeed's windows decide
    assert accounting.gather_windows(big, load_config(GPT3_LORA).zero) == accounting.DS_WINDOWS


def test_gloo_all_gather_stages_the_whole_gathered_size():
    """zero3_gather_staging's premise, measured in one process: a gloo all-gather allocates one receive buffer of
    the whole gathered size besides the output (the profiler's allocation trace, all threads), and the term is
    the largest DeepSpeed call (prefetch bucket + the largest tensor) in the base dtype, on CPU ranks only."""
    import torch
    import torch.distributed as dist

    from .test_activations import traced_peak
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
    part = torch.ones(1 << 19, dtype=torch.bfloat16)
    out = torch.zeros(1 << 19, dtype=torch.bfloat16)  # touched beforehand, as DeepSpeed's flat buffer is by then
    assert traced_peak(lambda: group._allgather_base(out, part).wait()) == out.nbytes
    assert bool((out == 1).all())
    cfg = load_config(None, ["model.dtype=bf16"])
    shape = accounting.shapes(cfg)[0]
    lay = Layout(world=2, stage=3, device="cpu", seq_len=16)
    call = accounting.gather_windows(shape, cfg.zero)["prefetch_bucket_size"] + max(n for _, n, _, _ in shape.tensors)
    assert accounting.gather_staging(shape, cfg, lay) == min(call, shape.total) * 2 > 0
    d = accounting.per_rank(shape, cfg, lay)
    assert d["zero3_gather_staging"] == min(call, shape.total) * 2
    assert accounting.gather_staging(shape, cfg, Layout(world=2, stage=3, device="gpu")) == 0  # NCCL: in place
    assert accounting.gather_staging(shape, cfg, Layout(world=2, stage=2, device="cpu")) == 0  # nothing gathered
