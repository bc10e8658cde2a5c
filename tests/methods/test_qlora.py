"""QLoRA: LoRA on a bitsandbytes NF4/FP4/int8 base, on tiny GPT-2 and LLaMA saved with save_pretrained (CPU)."""
from __future__ import annotations

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
from tests.conftest import TINY_GPT2, TINY_LLAMA, check, run_cli, tiny_config, train_losses, write_config

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
