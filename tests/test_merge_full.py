"""`bigadapt merge` of full fine-tuning and FTTop-k: nothing to fold, so the merged directory must be exactly the base
with the trained tensors in place. The reference is plain PyTorch: the base the run names, with the checkpoint's
tensors loaded by `load_state_dict` (no bigadapt code between them), against the merged directory as transformers
loads it."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from bigadapt import checkpoint, cli
from bigadapt.config import config_from_dict
from bigadapt.model import build_base
from tests.conftest import TINY_LLAMA, tiny_config
from tests.run_dirs import write_run

# full on GPT-2's causal LM (its lm_head tied to the embedding); FTTop-1 on a LLaMA classifier (last block, final
# norm, fresh head)
CASES = [("full", None, "causal_lm", {"name": "full"}),
         ("ft_top_k", TINY_LLAMA, "seq_cls", {"name": "ft_top_k", "top_k": 1})]


@pytest.mark.parametrize("name,arch,objective,method", CASES, ids=[c[0] for c in CASES])
def test_merge_writes_the_base_with_the_trained_tensors(tmp_path, capsys, name, arch, objective, method):
    task = "synthetic_lm" if objective == "causal_lm" else "synthetic_cls"
    cfg_dict = tiny_config(tmp_path / "run", **({"arch": arch} if arch else {}), model={"objective": objective},
                           method=method, data={"task": task})
    run = write_run(tmp_path / "run", cfg_dict)
    assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    auto = AutoModelForCausalLM if objective == "causal_lm" else AutoModelForSequenceClassification
    merged = auto.from_pretrained(tmp_path / "merged").eval()

    cfg = config_from_dict(cfg_dict)
    trained = load_file(checkpoint.complete(run / "checkpoints")[-1] / "adapter.safetensors")
    reference = build_base(cfg.model, cfg.train.seed).eval()
    ids = torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base_logits = reference(ids).logits
    got = reference.load_state_dict(trained, strict=False)
    assert not got.unexpected_keys and len(trained) > 4
    with torch.no_grad():
        expected, out = reference(ids).logits, merged(ids).logits
    diff = (out - expected).abs().max().item()
    print(f"bigadapt merge {name}: max |merged - base+trained| logit difference {diff:.2e} "
          f"(training moved the logits by {(expected - base_logits).abs().max().item():.2e})")
    assert diff <= 1e-6
    assert (expected - base_logits).abs().max() > 1e-3  # the trained tensors are in the merged model
