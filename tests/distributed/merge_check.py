"""Run by test_merge_under_zero3 on 2 ranks: merge/unmerge on a ZeRO-3-partitioned model, one case per method.

Every case moves the trainable tensors off their init, then compares the engine's logits merged, unmerged and
unmerged again with an independent reference: a plain PyTorch model (no DeepSpeed, no bigadapt wrapper) loaded
with the base weights plus the delta written out from the papers' formulas — LoRA W0 + s B A, DoRA
m (W0 + s B A) / ||W0 + s B A||_row, BitFit's q-slice bias added into the fused c_attn bias. The first case's
numbers are also written at the top level of the JSON (test_zero3 reads them); a case out of its bound fails the
script on rank 0 after the last collective, which fails the launch."""
import json
import sys

import torch

from bigadapt import methods, zero
from bigadapt.methods.bitfit import SliceBias
from bigadapt.methods.dora import DoRA
from bigadapt.methods.lora import LoRA
from tests.conftest import TINY_GPT2, TINY_LLAMA, zero3_engine

LORA = {"name": "lora", "r": 4, "alpha": 8}
# name: (arch, model keys, method, bound on every logit difference); bf16: the merged weight is rounded to bf16
CASES = {
    "lora": (TINY_GPT2, {}, dict(LORA, targets=["q", "v"]), 1e-5),
    "bitfit_subset": (TINY_GPT2, {}, {"name": "bitfit", "bitfit_subset": True}, 1e-5),
    "lora_bf16_base": (TINY_LLAMA, {"dtype": "bf16"}, dict(LORA, targets=["q", "v", "ffn_gate"]), 1e-2),
    "dora": (TINY_LLAMA, {}, dict(LORA, targets=["q", "v", "o"], dora=True), 1e-5),
    "dora_fused_slices": (TINY_GPT2, {}, dict(LORA, targets=["q", "v"], dora=True), 1e-5),
}
x = torch.randint(1, 96, (3, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def perturb(model, seed: int) -> None:
    """*Collective.* Every trainable tensor off its init (B = 0, m = ||W0||, zero q-bias hide a wrong merge),
    written by rank 0 and re-partitioned."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if p.requires_grad:
            with zero.gathered([p], modify=True) as writer, torch.no_grad():
                if writer:
                    scale = 0.5 if n.endswith("lora_B") else 0.1 * float(p.float().abs().mean()) or 0.1
                    p.data += (scale * torch.randn(p.shape, generator=g)).to(p.dtype)


def whole_state(model) -> dict:
    """*Collective.* Every parameter whole, one at a time (a tiny model: the reference needs all of it)."""
    state = {}
    for n, p in model.named_parameters():
        with zero.gathered([p]):
            state[n] = p.detach().clone()
    return state


def reference(model, state: dict) -> torch.Tensor:
    """Logits of a plain Hugging Face model holding W0 + delta for every wrapper of `model` (names only read)."""
    sd = {n.replace(".base_layer.", "."): t for n, t in state.items()
          if not n.endswith(("lora_A", "lora_B", "lora_magnitude_vector", "bitfit_bias"))}
    for name, m in model.named_modules():
        if isinstance(m, LoRA):
            w = sd[f"{name}.weight"]
            W = (w.t() if m.fan_in_fan_out else w).float().clone()  # [out, in]
            A, B = state[f"{name}.lora_A"].float(), state[f"{name}.lora_B"].float()
            row = 0
            for i, (a, b) in enumerate(m.spans):
                V = W[a:b] + m.scaling * B[row:row + b - a] @ A[i * m.r:(i + 1) * m.r]
                if isinstance(m, DoRA):
                    mag = state[f"{name}.lora_magnitude_vector"].float()[row:row + b - a]
                    V = mag[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True)
                W[a:b], row = V, row + b - a
            sd[f"{name}.weight"] = (W.t() if m.fan_in_fan_out else W).to(w.dtype).contiguous()
        elif isinstance(m, SliceBias):
            bias, q = sd[f"{name}.bias"].float().clone(), state[f"{name}.bitfit_bias"].float()
            row = 0
            for a, b in m.spans:
                bias[a:b], row = bias[a:b] + q[row:row + b - a], row + b - a
            sd[f"{name}.bias"] = bias.to(state[f"{name}.base_layer.bias"].dtype)
    plain = type(model)(model.config).eval()
    got = plain.load_state_dict(sd, strict=False, assign=True)
    assert not got.missing_keys and not got.unexpected_keys, got
    return logits(plain)


def check_case(name: str, arch: dict, model_keys: dict, method: dict, seed: int) -> dict:
    eng = zero3_engine(arch, model=model_keys, method=method)
    zero.unregister()  # built: the next case's meta-device accounting model must not be built under zero.Init
    eng.eval()
    base_out = logits(eng)
    perturb(eng.module, seed)
    before = logits(eng)
    state = whole_state(eng.module)
    ref = reference(eng.module, state) if zero.rank() == 0 else None
    methods.get(method["name"]).merge(eng.module)
    merged = logits(eng)
    methods.get(method["name"]).unmerge(eng.module)
    after = logits(eng)
    if zero.rank() != 0:
        return {}
    return {"delta_visible": (before - base_out).abs().max().item(),
            "merged_vs_unmerged": (merged - before).abs().max().item(),
            "unmerged_vs_before": (after - before).abs().max().item(),
            "merged_vs_reference": (merged - ref).abs().max().item(),
            "unmerged_vs_reference": (before - ref).abs().max().item()}


out = sys.argv[-1]
results = {name: check_case(name, *case[:3], seed=i + 1) for i, (name, case) in enumerate(CASES.items())}
if zero.rank() == 0:
    json.dump(dict(results["lora"], cases=results), open(out, "w"), indent=1)
    for name, diffs in results.items():
        print(name, json.dumps(diffs))
    for name, diffs in results.items():
        bound = CASES[name][3]
        assert diffs["delta_visible"] > 1e-3, (name, diffs)  # the perturbed method changes the output...
        for key in ("merged_vs_unmerged", "unmerged_vs_before", "merged_vs_reference", "unmerged_vs_reference"):
            assert diffs[key] <= bound, (name, key, diffs[key], bound)  # ...and merging changes nothing
