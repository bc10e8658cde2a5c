"""Weights the base checkpoint lacks (a pooler, the classifier) are part of the task head: trained and saved with
the adapter, so a reload in another process evaluates to the same numbers and peft loads the same model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertForMaskedLM, DebertaV2Model

from bigadapt.export import load_trained, resolve_checkpoint

from .conftest import check, metrics, run_cli, tiny_config, write_config

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "vocab_size": 96, "max_position_embeddings": 64, "pad_token_id": 0, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
CASES = {  # saved from a class without the sequence-classification pooler -> modules missing on load
    "deberta-v2": (DebertaV2Model, ["classifier", "pooler"]),
    "bert": (BertForMaskedLM, ["classifier", "bert.pooler"]),
}


def _inputs():
    ids = torch.randint(1, 96, (6, 16), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    mtype = request.param
    cls, new = CASES[mtype]
    root = tmp_path_factory.mktemp(mtype)
    torch.manual_seed(0)
    cls(AutoConfig.for_model(mtype, **TINY)).save_pretrained(root / "base")
    cfg = tiny_config(root / "run", model={"name_or_path": str(root / "base"), "arch": {}, "objective": "seq_cls"},
                      train={"max_steps": 6, "lr": 5e-3}, data={"num_eval": 48})
    proc = check(run_cli("train", "--config", str(write_config(root / "cfg.yaml", cfg))))
    return root, new, proc


def test_missing_weights_are_trained_and_saved(trained):
    root, new, proc = trained
    assert f"part of the task head: {', '.join(sorted(new, key=lambda n: n != 'classifier'))}" in proc.stdout \
        or all(n in proc.stdout for n in new), proc.stdout[-2000:]
    saved = json.loads((resolve_checkpoint(root / "run") / "manifest.json").read_text())["tensors"]
    for module in new:
        assert any(n.startswith(module + ".") for n in saved), (module, sorted(saved))


def test_reload_in_another_process_gives_the_training_eval(trained):
    root, _, _ = trained
    final = [m for m in metrics(root / "run") if m.get("split") == "eval"][-1]
    check(run_cli("eval", str(root / "run")))
    again = json.loads((root / "run" / "eval-dev.json").read_text())["metrics"]
    assert again["accuracy"] == final["accuracy"]
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_peft_export_loads_to_the_same_logits(trained):
    from peft import PeftModel
    root, new, _ = trained
    out = root / "peft"
    check(run_cli("export", str(root / "run"), str(out), "--format", "peft"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(new) <= set(config["modules_to_save"])
    ours, _, _ = load_trained(root / "run")
    torch.manual_seed(123)  # what a peft user's base draws for the missing weights must not matter
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=2).eval()
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**_inputs()).logits, ours(**_inputs()).logits, rtol=1e-5, atol=1e-5)
