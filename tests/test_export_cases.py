"""PEFT export beyond GPT-2's fused q,v classifier: LLaMA's separate Linear targets, the causal-LM task type,
rsLoRA, QLoRA; and, for every method bigadapt knows, that `export` and `merge` accept exactly what
`bigadapt.export.PEFT_METHODS` / `MERGEABLE` say, refusing the rest in one line before writing anything.

The runs are written in this process (tests/run_dirs.py), not trained: these tests are about what leaves bigadapt.
peft loads each export onto the base the export names (`base_model_name_or_path`, loaded with transformers alone),
and must give the logits of bigadapt's own rebuilt model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from bigadapt import cli, export
from bigadapt.errors import BigadaptError
from bigadapt.methods import METHODS
from tests.conftest import TINY_GPT2, TINY_LLAMA, tiny_config
from tests.run_dirs import write_run

LORA = {"name": "lora", "r": 4, "alpha": 8}
# (id, arch, objective, model keys, method, bound): the bound is float32 rounding (measured below it: see -s)
CASES = [
    ("llama-causal_lm-linear", TINY_LLAMA, "causal_lm", {},
     dict(LORA, targets=["q", "k", "v", "o", "ffn_gate", "ffn_in", "ffn_out"]), 1e-5),
    ("llama-seq_cls-rslora", TINY_LLAMA, "seq_cls", {}, dict(LORA, targets=["q", "v"], rslora=True), 1e-5),
    ("gpt2-causal_lm-rslora", TINY_GPT2, "causal_lm", {}, dict(LORA, targets=["q", "v"], rslora=True), 1e-5),
    # the same packed 4-bit base on both sides, so the comparison is as tight as full precision's
    ("llama-causal_lm-qlora-nf4", TINY_LLAMA, "causal_lm", {"quantization": "nf4"},
     dict(LORA, name="qlora", targets=["q", "v", "ffn_in"]), 1e-5),
]
AUTO = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}


def _ids() -> torch.Tensor:
    return torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(7))


def _cfg(tmp_path, arch, objective, model, method) -> dict:
    task = "synthetic_lm" if objective == "causal_lm" else "synthetic_cls"
    return tiny_config(tmp_path / "run", arch=arch, model=dict(model, objective=objective), method=method,
                       data={"task": task})


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_peft_loads_each_export_with_our_logits(tmp_path, case):
    from peft import PeftModel
    name, arch, objective, model_keys, method, bound = case
    run = write_run(tmp_path / "run", _cfg(tmp_path, arch, objective, model_keys, method))
    assert cli.main(["export", str(run), str(tmp_path / "peft")]) == 0
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["task_type"] == {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[objective]
    base = AUTO[objective].from_pretrained(conf["base_model_name_or_path"]).eval()  # what a peft user loads
    with torch.no_grad():
        plain = base(_ids()).logits.float()
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours, _, _ = export.load_trained(run)
    with torch.no_grad():
        got, expected = theirs(_ids()).logits.float(), ours(_ids()).logits.float()
    diff = (got - expected).abs().max().item()
    print(f"{name}: max |peft - bigadapt| logit difference {diff:.2e} (adapter's effect "
          f"{(expected - plain).abs().max().item():.2e})")
    assert diff <= bound
    assert (expected - plain).abs().max() > 100 * bound  # the adapter is in both


def _every_method_run(tmp_path, name: str):
    """A run of `name` on tiny GPT-2 (qlora on its quantized twin; prefix methods with a prefix)."""
    model = {"quantization": "nf4"} if name == "qlora" else {}
    method = dict(LORA if "lora" in name else {}, name=name,
                  **({"l_p": 2} if name.startswith("pre_") or "+p" in name else {}))
    return write_run(tmp_path / name, tiny_config(tmp_path / name, model=model, method=method))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_and_merge_accept_what_the_table_in_code_says(tmp_path, capsys, name):
    """The one table (export.PEFT_METHODS, export.MERGEABLE; docs/methods.md quotes it) against the behaviour,
    for every method name bigadapt knows: an accepted one writes its output, a refused one exits 2 with one line
    naming the method and writes no output directory."""
    run = _every_method_run(tmp_path, name)
    refusals = []
    for command, accepted, artifact in (("export", export.PEFT_METHODS, "adapter_config.json"),
                                        ("merge", export.MERGEABLE, "config.json")):
        out = tmp_path / f"{name}-{command}"
        capsys.readouterr()
        code = cli.main([command, str(run), str(out)])
        err = capsys.readouterr().err
        if name in accepted:
            assert code == 0 and (out / artifact).is_file(), err
        else:
            assert code == 2 and err.count("\n") == 1 and err.startswith("bigadapt: error: "), err
            assert name.split("_")[0] in err and "Traceback" not in err, err
            assert not out.exists(), f"{command} of {name} created {out} before refusing"
            refusals.append(f"{command} {name}: {err.strip()}")
    print("\n".join(refusals))


def test_the_table_names_only_known_methods():
    assert export.PEFT_METHODS | export.MERGEABLE <= set(METHODS)


def test_a_refused_export_builds_no_model(tmp_path, monkeypatch):
    """The refusal reads the run's config only: no base is built (a 175B base would take hours)."""
    run = _every_method_run(tmp_path, "adapter_h")
    monkeypatch.setattr(export, "load_trained", lambda *_a, **_k: pytest.fail("built the model"))
    with pytest.raises(BigadaptError, match="PEFT export covers"):
        export.to_peft(run, tmp_path / "out")
