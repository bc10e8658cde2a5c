"""PreEmbed, PreLayer, LoRA+PE, LoRA+PL for real: 2 ranks under ZeRO-3 (every tensor partitioned, so a prefix
table read outside its module's forward would be an empty placeholder) against the same run in one process at
stage 0, a resume with a larger max_steps, and the checkpoint loaded on the CPU without DeepSpeed."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint
from bigadapt.export import load_trained
from tests.conftest import (
    REPO,
    TINY_GPT2,
    TINY_LLAMA,
    check,
    env,
    launch,
    tiny_config,
    train_each,
    train_losses,
    write_config,
)

pytestmark = pytest.mark.distributed
TINY_BERT = {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 96, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0, "pad_token_id": 0}
LM = {"objective": "causal_lm"}
# method -> (arch, model section, l_p, l_i, the checkpoint's non-LoRA tensors and their full shapes)
CASES = {
    "pre_embed": (TINY_GPT2, {}, 4, 2, {"prefix_tuning.embedding.weight": (6, 64), "score.weight": (2, 64)}),
    "pre_layer": (TINY_BERT, {}, 3, 2, {"prefix_tuning.embedding.weight": (5, 64),
                                        "prefix_tuning.after_layer.0.weight": (5, 64),
                                        "classifier.weight": (2, 64), "classifier.bias": (2,)}),
    "lora+pe": (TINY_LLAMA, LM, 4, 2, {"prefix_tuning.embedding.weight": (6, 64)}),
    "lora+pl": (TINY_LLAMA, {}, 2, 1, {"prefix_tuning.embedding.weight": (3, 64),
                                       "prefix_tuning.after_layer.0.weight": (3, 64), "score.weight": (2, 64)}),
}
LORA = {"q_proj.lora_A": (4, 64), "q_proj.lora_B": (64, 4), "v_proj.lora_A": (4, 64), "v_proj.lora_B": (32, 4)}


def _config(tmp: Path, name: str, method: str, max_steps: int) -> Path:
    """`name` is the run directory; the YAML is `name-max_steps.yaml` (a run and its longer resume share it)."""
    arch, model, l_p, l_i, _ = CASES[method]
    lm = model.get("objective") == "causal_lm"
    cfg = tiny_config(tmp / name, arch=arch, model=dict(model, arch=dict(arch)),
                      method={"name": method, "l_p": l_p, "l_i": l_i},
                      data={"task": "synthetic_lm" if lm else "synthetic_cls", "seq_len": 12, "num_eval": 16},
                      # warmup longer than the run: the lr of a step does not depend on max_steps
                      train={"max_steps": max_steps, "save_every": 2, "keep_last": 5, "lr": 2e-2, "warmup_steps": 10})
    return write_config(tmp / f"{name}-{max_steps}.yaml", cfg)


def main(root: Path, phase: str) -> int:
    """Run as a script, every case in the same process(es), so imports (and the launcher) are paid once per phase:
    "zero3" on 2 ranks (2 steps each); then "single" in one process: each case's 4-step reference and the
    resume of its 2-rank run to 4 steps. The configs were written before the launch."""
    if phase == "zero3":
        return train_each(root / f"zero3-{method}-2.yaml" for method in CASES)
    return (train_each(root / f"single-{method}-4.yaml" for method in CASES)
            or train_each((root / f"zero3-{method}-4.yaml" for method in CASES), "--resume", "auto"))


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prefix")
    for method in CASES:
        for name, steps in (("single", 4), ("zero3", 2), ("zero3", 4)):
            _config(root, f"{name}-{method}", method, steps)
    script = "tests/distributed/test_prefix_methods.py"
    check(launch(2, str(root), "zero3", script=script, timeout=600))
    for method in CASES:
        shutil.copytree(checkpoint.complete(root / f"zero3-{method}" / "checkpoints")[-1], root / f"first-{method}")
        shutil.copy(root / f"zero3-{method}" / "metrics.jsonl", root / f"first-{method}.jsonl")
    proc = check(subprocess.run([sys.executable, script, str(root), "single"], cwd=REPO, env=env(),
                                capture_output=True, text=True, timeout=600))
    (root / "single.log").write_text(proc.stdout + proc.stderr)
    return root


@pytest.fixture(params=list(CASES))
def runs(request, all_runs) -> dict:
    """single: 4 steps in one process (stage 0), the reference. zero3: 2 steps on 2 ranks, then resumed in one
    process at stage 0 with max_steps 4 (a checkpoint from N ranks resumes on M)."""
    method, root = request.param, all_runs
    zero3 = root / f"zero3-{method}"
    return {"method": method, "single": root / f"single-{method}", "zero3": zero3,
            "zero3_losses": train_losses_file(root / f"first-{method}.jsonl"), "first": root / f"first-{method}",
            "log": (root / "single.log").read_text(), "zero3_ckpt_dir": str(zero3 / "checkpoints")}


def _adapter(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    ckpts = checkpoint.complete(run_dir / "checkpoints")
    ckpt = ckpts[-1] if step is None else next(c for c in ckpts if c.name.endswith(f"{step:08d}"))
    return load_file(ckpt / "adapter.safetensors")


def test_checkpoint_holds_exactly_the_method_tensors_at_full_shape(runs):
    *_, expected = CASES[runs["method"]]
    if runs["method"].startswith("lora"):
        expected = dict(expected, **{f"model.layers.{i}.self_attn.{k}": s for i in (0, 1) for k, s in LORA.items()})
    for tensors in (load_file(runs["first"] / "adapter.safetensors"), _adapter(runs["zero3"])):
        assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
        assert all(t.dtype == torch.float32 for t in tensors.values())
    assert checkpoint.verify(runs["first"])["world_size_at_save"] == 2


def test_two_ranks_train_like_one_process_and_resume_continues(runs):
    single, zero3, resumed = train_losses(runs["single"]), runs["zero3_losses"], train_losses(runs["zero3"])
    assert sorted(zero3) == [1, 2] and sorted(resumed) == [1, 2, 3, 4]
    assert f"resumed from {runs['zero3_ckpt_dir']}" in runs["log"]
    for step in (1, 2):  # a prefix table read as ZeRO-3's empty placeholder, or a wrong init, changes these
        assert zero3[step] == pytest.approx(single[step], rel=1e-5), (step, zero3, single)
    for step in (3, 4):  # continued from the 2-rank checkpoint in one process
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), (step, resumed, single)
    a, b = _adapter(runs["single"]), _adapter(runs["zero3"])
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6)
    before = load_file(runs["first"] / "adapter.safetensors")
    assert not torch.equal(b["prefix_tuning.embedding.weight"], before["prefix_tuning.embedding.weight"])


def test_loads_in_one_cpu_process(runs):
    model, manifest, cfg = load_trained(runs["zero3"])
    assert manifest["step"] == 4 and manifest["world_size_at_save"] == 1
    saved = _adapter(runs["zero3"])
    params = dict(model.named_parameters())
    for n, t in saved.items():
        assert torch.equal(params[n].detach().float(), t), n
    x = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert logits.shape == ((2, 12, 96) if cfg.model.objective == "causal_lm" else (2, 2))
    assert torch.isfinite(logits).all()
    if cfg.model.objective == "causal_lm":
        out = model.generate(x[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape[1] <= 9


def train_losses_file(path: Path) -> dict[int, float]:
    """The losses of a metrics.jsonl copied out of its run directory (before the run was resumed)."""
    import json
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
