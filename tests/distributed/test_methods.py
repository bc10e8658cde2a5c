"""Every non-LoRA method trained for real: 2 ranks under ZeRO-3 and 1 process without ZeRO, same results.

One `deepspeed --num_gpus 2` launch runs this file as a script: it trains every case in turn in the same two
processes (`bigadapt train` per case, max_steps 2), so the launcher and imports are paid once. Each case is
also trained by `bigadapt train` in a single process at ZeRO stage 0. The tests then check, per case, that
the checkpoint holds exactly the method's tensors at full shape, that it loads in one CPU process and
reproduces the run's final eval loss, and that ZeRO-3 on 2 ranks and stage 0 on 1 rank agree.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint, objectives
from bigadapt.data import build_task
from bigadapt.data.batching import collate, count_targets
from tests.conftest import TINY_GPT2, check, launch, run_cli, tiny_config, train_each, train_losses, write_config

pytestmark = pytest.mark.distributed

TINY_BERT = {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 96, "max_position_embeddings": 64, "pad_token_id": 0,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY_ROBERTA = dict(TINY_BERT, model_type="roberta", max_position_embeddings=66, pad_token_id=1)

# case -> (arch, method section, predicate every trained tensor name must satisfy)
HEAD = ("score.", "classifier.")
CASES = {
    "bitfit": (TINY_GPT2, {"name": "bitfit"}, lambda n: n.endswith(".bias")),
    "bitfit_subset": (TINY_GPT2, {"name": "bitfit", "bitfit_subset": True},
                      lambda n: n.endswith(("attn.c_attn.bitfit_bias", "mlp.c_fc.bias"))),
    "bitfit_bert": (TINY_BERT, {"name": "bitfit"}, lambda n: n.endswith(".bias")),
    "bitfit_roberta": (TINY_ROBERTA, {"name": "bitfit"}, lambda n: n.endswith(".bias")),
    "adapter_h": (TINY_GPT2, {"name": "adapter_h", "r": 4}, lambda n: ".adapter_" in n or ".ln_" in n),
    "adapter_l": (TINY_GPT2, {"name": "adapter_l", "r": 4}, lambda n: "mlp.c_proj.adapter_" in n),
    "adapter_p": (TINY_GPT2, {"name": "adapter_p", "r": 4}, lambda n: "mlp.c_proj.adapter_" in n),
    "adapter_d": (TINY_GPT2, {"name": "adapter_d", "r": 4, "adapter_drop": 1},
                  lambda n: n.startswith("transformer.h.1.mlp.c_proj.adapter_")),
    "full": (TINY_GPT2, {"name": "full"}, lambda n: True),
    "ft_top_k": (TINY_GPT2, {"name": "ft_top_k", "top_k": 1},
                 lambda n: n.startswith(("transformer.h.1.", "transformer.ln_f."))),
}
# also trained in one process at stage 0: every method once (BERT/RoBERTa BitFit only need the ZeRO-3 check)
SINGLE = [c for c in CASES if c not in ("bitfit_bert", "bitfit_roberta")]


def case_config(root: Path, case: str, ranks: int) -> Path:
    arch, method, _ = CASES[case]
    run_dir = root / f"{case}-{ranks}"
    cfg = tiny_config(run_dir, arch=arch, method=method, data={"num_eval": 32},
                      train={"max_steps": 2, "lr": 5e-3}, zero={"stage": 3 if ranks > 1 else 0})
    return write_config(root / f"{case}-{ranks}.yaml", cfg)


def main(root: Path) -> int:
    """Under the launcher: every case in these same ranks, one `bigadapt train` after another. The configs
    were written before the launch: a rank writing a file another rank is reading can hand it a partial one."""
    return train_each(root / f"{case}-2.yaml" for case in CASES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    for case in CASES:
        case_config(root, case, 2)
    check(launch(2, str(root), script="tests/distributed/test_methods.py", timeout=600))
    for case in SINGLE:
        check(run_cli("train", "--config", str(case_config(root, case, 1))))
    return root


def _newest(run_dir: Path) -> Path:
    return checkpoint.complete(run_dir / "checkpoints")[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_holds_exactly_the_methods_tensors_at_full_shape(runs, case):
    from bigadapt.export import load_trained
    run_dir = runs / f"{case}-2"
    ckpt = _newest(run_dir)
    tensors = load_file(ckpt / "adapter.safetensors")
    layout = json.loads((run_dir / "layout.json").read_text())
    model, manifest, _ = load_trained(run_dir)  # one CPU process, no DeepSpeed
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == trainable  # exactly these, at full shape
    assert all(CASES[case][2](n) for n in tensors if not n.startswith(HEAD)), sorted(tensors)
    assert any(not n.startswith(HEAD) for n in tensors)
    assert sum(t.numel() for t in tensors.values()) == layout["trainable_numel_total"]
    assert manifest["world_size_at_save"] == 2
    for r in layout["ranks"]:  # ZeRO-3 really partitioned: each rank holds half of the trainable set
        assert abs(r["trainable_numel"] - layout["trainable_numel_total"] / 2) <= len(tensors)
    assert _eval_loss(model, manifest) == pytest.approx(_final_eval(run_dir), rel=1e-4)


@pytest.mark.parametrize("case", SINGLE)
def test_zero3_on_two_ranks_matches_one_process_without_zero(runs, case):
    two, one = runs / f"{case}-2", runs / f"{case}-1"
    ref, got = train_losses(one), train_losses(two)
    assert got.keys() == ref.keys() == {1, 2}
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])
    a, b = load_file(_newest(one) / "adapter.safetensors"), load_file(_newest(two) / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def _final_eval(run_dir: Path) -> float:
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    return evals[-1]["eval_loss"]


@torch.no_grad()
def _eval_loss(model, manifest: dict) -> float:
    """The run's eval loss recomputed from the checkpoint alone."""
    from bigadapt.config import config_from_dict
    from bigadapt.model import pad_id
    cfg = config_from_dict(manifest["config"])
    task = build_task(cfg, model.config.vocab_size)
    batch = collate(task.eval, task.objective, pad_id(model))
    labels = batch.pop("labels")
    return objectives.loss_sum(model(**batch).logits, labels, task.objective).item() / count_targets(
        task.eval, task.objective)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[-1])))
