"""QLoRA: LoRA on a bitsandbytes NF4/FP4/int8 base, on tiny GPT-2 and LLaMA saved with save_pretrained (CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from bigadapt import accounting, checkpoint, methods, targets
from bigadapt import model as base_model
from bigadapt.config import config_from_dict
from bigadapt.errors import BigadaptError, ConfigError
from bigadapt.export import load_trained
from bigadapt.fingerprint import fingerprint
from bigadapt.methods.qlora import QLoRA
from tests.conftest import REPO, TINY_GPT2, TINY_LLAMA, check, env, run_cli, tiny_config, train_losses, write_config

IDS = torch.randint(2, 96, (3, 12), generator=torch.Generator().manual_seed(0))
# max |logit difference| / max |logit| against the full-precision LoRA with the same adapter, measured on this
# GPT-2 base (bitsandbytes 4-bit/8-bit CPU kernels, deterministic for fixed weights): nf4 0.058, fp4 0.097,
# int8 0.0090; the bounds are ~2x that (a coarser quantizer, or a LoRA branch fed quantized inputs, exceeds them)
TOLERANCE = {"nf4": 0.12, "fp4": 0.2, "int8": 0.018}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Tiny GPT-2 and LLaMA classifiers written with save_pretrained (std 0.02 init, like a real base)."""
    out = {}
    for arch in (TINY_GPT2, TINY_LLAMA):
        fields = dict(arch)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields, num_labels=2)
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(arch["model_type"])
        AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
        out[arch["model_type"]] = str(path)
    return out


def build(path: str, quantization: str = "nf4", targets_=("q", "v"), **method):
    name = "qlora" if quantization != "none" else "lora"
    cfg = config_from_dict({"model": {"name_or_path": path, "quantization": quantization},
                            "method": {"name": name, "r": 4, "targets": list(targets_), **method}})
    model = base_model.build_base(cfg.model, seed=0)
    torch.manual_seed(1)
    methods.apply(model, cfg)
    return cfg, model


def set_adapter(model, seed: int = 2) -> None:
    """A non-zero B (LoRA starts at B = 0, which would hide the adapter's contribution)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_only_lora_learns_and_the_base_is_unchanged(saved, arch):
    _, model = build(saved[arch], train_head=False)
    assert any(isinstance(m, QLoRA) for m in model.modules())
    assert {type(m).__name__ for m in model.modules()} >= {"Linear4bit"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=IDS, labels=torch.tensor([0, 1, 1])).loss.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded and all(n.endswith(("lora_A", "lora_B")) for n in graded)
    opt.step()
    model.eval()
    with torch.no_grad():  # an evaluation must not repack the 4-bit weights (avx512_bf16 CPUs)
        model(input_ids=IDS)
    model.train()
    model(input_ids=IDS).logits.sum().backward()  # training still works after an evaluation
    for n, p in model.named_parameters():
        if not p.requires_grad:
            # bitwise: packed 4-bit codes read as floats include NaN patterns
            assert torch.equal(p.detach().view(torch.uint8), frozen[n].view(torch.uint8)), n


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_close_to_full_precision_lora(saved, quantization):
    _, full = build(saved["gpt2"], "none")
    _, quant = build(saved["gpt2"], quantization)
    for m in (full, quant):
        set_adapter(m)
        m.eval()
    with torch.no_grad():
        ref, out = full(input_ids=IDS).logits, quant(input_ids=IDS).logits
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"{quantization}: max relative logit error {rel:.4f}")
    assert 0 < rel < TOLERANCE[quantization]


def test_training_run_learns_saves_only_lora_and_reloads(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, arch=TINY_LLAMA, model={"quantization": "nf4"}, method={"name": "qlora"},
                      train={"max_steps": 10, "lr": 5e-3, "log_every": 1},
                      data={"num_eval": 32})
    check(run_cli("train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))))
    losses = list(train_losses(run_dir).values())
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    ckpt = checkpoint.complete(run_dir / "checkpoints")[-1]
    names = set(load_file(ckpt / "adapter.safetensors"))
    assert names and all(n.endswith(("lora_A", "lora_B")) or n.startswith("score.") for n in names)
    model, manifest, _ = load_trained(run_dir)  # rebuilds the quantized base; its fingerprint must match
    assert manifest["config"]["model"]["quantization"] == "nf4"
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_fingerprint_of_a_quantized_base_is_stable_and_tells_bases_apart(saved):
    fps = [fingerprint(build(saved[a])[1], exclude=["score"]) for a in ("gpt2", "gpt2", "llama")]
    assert fps[0] == fps[1] and fps[0]["weights_sha256"] != fps[2]["weights_sha256"]


def test_accounting_predicts_the_quantized_bytes(saved):
    cfg, model = build(saved["llama"])
    measured = 0
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            state = m.weight.quant_state
            tensors = [state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
            measured += m.weight.numel() * m.weight.element_size() + sum(t.numel() * t.element_size() for t in tensors)
        elif not any(isinstance(c, torch.nn.Module) and type(c).__name__ == "Linear4bit" for c in [m]):
            measured += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False) if not p.requires_grad)
    shape, _ = accounting.shapes(cfg)
    predicted = accounting.model_states(shape.tensors, cfg, accounting.Layout(1, 0))[0]["base_partition"]
    assert predicted == measured


def test_one_line_errors(saved):
    base = {"model": {"name_or_path": saved["gpt2"]}, "method": {"name": "qlora"}}
    with pytest.raises(ConfigError, match="set model.quantization=nf4"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match="model.quantization='nf4'.*method.name=qlora"):
        config_from_dict({"model": {"name_or_path": saved["gpt2"], "quantization": "nf4"}})
    with pytest.raises(ConfigError, match="model.quantization='nf5'"):
        config_from_dict({**base, "model": {**base["model"], "quantization": "nf5"}})
    with pytest.raises(ConfigError, match="model.dtype='fp16'"):
        config_from_dict({**base, "model": {**base["model"], "quantization": "nf4", "dtype": "fp16"}})
    _, model = build(saved["gpt2"])
    with pytest.raises(BigadaptError, match="cannot merge into a quantized base"):
        methods.get("qlora").merge(model)
    assert targets.head_prefixes(model) == ["score"]


# One process, one rank: the base loaded 4-bit by transformers' from_pretrained (no ZeRO), then by
# quantized_loading's stream under ZeRO-3 (every tensor partitioned as it is read); everything gathered and compared
# as bytes: the packed codes, every quant-state entry (absmax, nested absmax and code books, offset), buffers, and the
# logits. argv: (checkpoint dir, objective, dtype) triples, one JSON line each.
STREAM_CHECK = textwrap.dedent("""
    import json, sys, torch
    from bigadapt import display, engine, targets, zero
    from bigadapt import model as base_model
    engine.init_distributed()
    logged = []
    display.log = lambda msg, *a, **k: logged.append(msg)
    as_bytes = lambda t: t.view(torch.uint8) if t.is_floating_point() else t
    ids = torch.randint(2, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    for path, objective, dtype_name in zip(*[iter(sys.argv[1:])] * 3):
        mcfg = type("M", (), {"name_or_path": path, "trust_remote_code": False, "objective": objective,
                              "num_labels": 2, "quantization": "nf4", "dtype": dtype_name})()
        kwargs = dict(config=base_model.hf_config(mcfg), dtype=base_model.DTYPES[dtype_name],
                      quantization_config=base_model.bnb_config(mcfg))
        auto = base_model._auto_class(objective)
        ref = base_model.from_pretrained(auto, path, **kwargs)  # no ZeRO-3 registered: transformers' path
        zero.register_for_loading({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": dtype_name == "bf16"},
                                   "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
        logged.clear()
        ours = base_model.from_pretrained(auto, path, **kwargs)
        zero.unregister()
        for m in (ref, ours):
            base_model.random_init(m, 0, targets.head_prefixes(m))  # a fresh head, as build_base draws it
        heads = targets.head_prefixes(ours)
        with zero.gathered(list(ours.parameters())), torch.no_grad():
            a, b = ref.state_dict(), ours.state_dict()
            differ = sorted(n for n in a if n not in b or not torch.equal(as_bytes(a[n]), as_bytes(b[n])))
            logits = [m(input_ids=ids).logits for m in (ref, ours)]
        print("RESULT", json.dumps({
            "differ": differ, "keys": sorted(a), "extra": sorted(set(b) - set(a)), "heads": heads,
            "partitioned": all(zero.is_zero(p) for n, p in ours.named_parameters()  # a fresh head: whole until
                               if not any(n.startswith(h + ".") for h in heads)),  # deepspeed.initialize
            "quant_states": sum(1 for k in a if k.endswith("quant_state.bitsandbytes__nf4")),
            "logits_equal": torch.equal(as_bytes(logits[0]), as_bytes(logits[1])), "logged": list(logged)}))
""")


def test_streamed_zero3_load_equals_transformers_bit_for_bit(saved):
    """GPT-2 classifier (Conv1D quantized transposed; its fp32 checkpoint cast to bf16, then quantized) and LLaMA
    read as a causal LM from a classifier's checkpoint (lm_head missing: a fresh head; the packed codes stored in
    fp32), in one process."""
    cases = [(saved["gpt2"], "seq_cls", "bf16"), (saved["llama"], "causal_lm", "fp32")]
    proc = subprocess.run([sys.executable, "-c", STREAM_CHECK, *[x for c in cases for x in c]], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert len(results) == len(cases)
    for got, heads in zip(results, (["score"], ["lm_head"])):
        assert got["differ"] == [] and got["extra"] == [], got["differ"] + got["extra"]
        assert got["quant_states"] >= 4 and any(k.endswith(".absmax") for k in got["keys"])
        assert got["partitioned"] and got["logits_equal"] and got["heads"] == heads
        assert any("partitioned as read" in line for line in got["logged"]), got["logged"]
        assert not any("quantized by transformers" in line for line in got["logged"]), got["logged"]


def test_estimate_states_the_loading_path_and_peak():
    """`bigadapt estimate` for a quantized base: under ZeRO-3 nf4 the stream (the partition + one tensor read whole
    with its packed codes); int8 or one rank without ZeRO-3: transformers' path, the whole quantized base."""
    from bigadapt import quantized
    cfg = config_from_dict(tiny_config("unused", arch=TINY_LLAMA, model={"quantization": "nf4"},
                                       method={"name": "qlora"}))
    ts = accounting.shapes(cfg)[0].tensors
    streamed = quantized.load_peak(ts, cfg, 2, 3, 2)
    mlp = TINY_LLAMA["intermediate_size"] * TINY_LLAMA["hidden_size"]
    largest = mlp * 2 + mlp // 2  # an MLP weight read in bf16 and its packed codes (above the 96 x 64 embedding)
    assert streamed["path"].startswith("streamed") and streamed["largest_tensor"] == largest
    assert streamed["peak"] == quantized.base_bytes(ts, cfg, 2, 2) + largest < streamed["whole"] + largest
    assert quantized.load_peak(ts, cfg, 1, 0, 2)["path"].startswith("transformers")
    int8 = config_from_dict({**tiny_config("unused", arch=TINY_LLAMA, method={"name": "qlora"}),
                             "model": {"arch": TINY_LLAMA, "quantization": "int8"}})
    whole = quantized.load_peak(accounting.shapes(int8)[0].tensors, int8, 2, 3, 2)
    assert whole["path"].startswith("transformers") and whole["peak"] == whole["whole"]
    out = check(run_cli("estimate", "--set", "model.quantization=nf4", "--set", "method.name=qlora",
                        "--world", "2"))
    assert "loading the quantized base: streamed" in " ".join(out.stdout.split())
