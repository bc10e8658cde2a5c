"""The streaming merge (one tensor at a time from the base's safetensors shards) writes the same model as the
in-memory merge: every tensor equal bit for bit, the same config, generation config and tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, BertModel

from bigadapt import export
from bigadapt.errors import BigadaptError
from tests.bpe import train_bpe
from tests.conftest import check, run_cli, tiny_config, write_config

CORPUS = ["the cat sat on the mat", "a dog ran to the park", "hello world, hello cat"] * 10
ARCHS = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=64),
    "bert": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
LORA = {"name": "lora", "r": 4, "alpha": 8}
# (arch, dtype, objective, method): GPT-2's fused c_attn (Conv1D, q and v slices), LLaMA's separate Linears,
# BitFit in place and on a fused slice, a seq_cls head, rsLoRA, and a bare BertModel base (prefixed names)
CASES = [
    ("gpt2", "fp32", "causal_lm", dict(LORA, targets=["q", "v"], rslora=True)),
    ("gpt2", "bf16", "seq_cls", dict(LORA, targets=["q", "v"])),
    ("gpt2", "bf16", "causal_lm", {"name": "bitfit", "bitfit_subset": True}),
    ("gpt2", "fp32", "seq_cls", {"name": "bitfit"}),
    ("llama", "bf16", "causal_lm", dict(LORA, targets=["q", "v", "ffn_gate"])),
    ("llama", "fp32", "seq_cls", dict(LORA, targets=["q", "v", "ffn_gate"])),
    ("bert", "fp32", "seq_cls", dict(LORA, targets=["q", "v"])),
    # W0's residual rebuilt on the skeleton before the merge (PiSSA on fused slices), and DoRA's magnitude
    ("gpt2", "fp32", "causal_lm", dict(LORA, targets=["q", "v"], lora_init="pissa")),
    ("llama", "fp32", "causal_lm", dict(LORA, targets=["q", "v"], dora=True)),
]


def sharded_base(folder: Path, arch: str) -> Path:
    """A random base saved as the hub does, in several safetensors shards with an index, with a tokenizer."""
    tok = train_bpe(folder, CORPUS, 200, ["<|endoftext|>"], "<|endoftext|>")
    config = AutoConfig.for_model(arch, vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                  **ARCHS[arch])
    torch.manual_seed(0)
    model = BertModel(config) if arch == "bert" else AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # nonzero biases, so a bias merge that dropped the base's value would show
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def train(root: Path, arch: str, dtype: str, objective: str, method: dict) -> Path:
    base = sharded_base(root / "base", arch)
    task = "synthetic_lm" if objective == "causal_lm" else "synthetic_cls"
    cfg = tiny_config(root / "run", model={"name_or_path": str(base), "arch": {}, "objective": objective,
                                           "dtype": dtype},
                      method=method, data={"task": task, "seq_len": 16, "num_train": 64, "num_eval": 8},
                      train={"max_steps": 3, "lr": 2e-2, "batch_size": 8, "micro_batch": 4})
    check(run_cli("train", "--config", str(write_config(root / "cfg.yaml", cfg))))
    return root / "run"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            found.update({k: st.get_tensor(k) for k in st.keys()})
    return found


def _case_id(arch, dtype, objective, method) -> str:
    variant = method.get("lora_init") or ("dora" if method.get("dora") else "")
    return "-".join(x for x in (arch, dtype, objective, method["name"], variant) if x)


@pytest.mark.parametrize("arch,dtype,objective,method", CASES, ids=[_case_id(*c) for c in CASES])
def test_streamed_merge_equals_the_in_memory_merge(tmp_path, capsys, arch, dtype, objective, method):
    run = train(tmp_path, arch, dtype, objective, method)
    export.merged(run, tmp_path / "memory", stream=False)
    export.merged(run, tmp_path / "stream")
    assert "streamed tensor by tensor" in capsys.readouterr().out
    mem, got = tensors(tmp_path / "memory"), tensors(tmp_path / "stream")
    assert sorted(got) == sorted(mem)
    for name, t in mem.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name  # bit for bit
    base = tensors(tmp_path / "base")  # a bare BertModel's names lack the "bert." of the classifier's
    before = {n: base.get(n, base.get(n.partition(".")[2])) for n in got}
    assert any(b is not None and not torch.equal(b.to(got[n].dtype), got[n]) for n, b in before.items())  # merged
    for fname in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        a, b = tmp_path / "memory" / fname, tmp_path / "stream" / fname
        assert a.is_file() == b.is_file(), fname
        if a.is_file():
            assert json.loads(a.read_text()) == json.loads(b.read_text()), fname
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and len(set(index["weight_map"].values())) > 2


def test_streamed_output_loads_and_is_refused_as_a_base(tmp_path):
    run = train(tmp_path, "llama", "bf16", "causal_lm", dict(LORA, targets=["q", "v"]))
    export.merged(run, tmp_path / "stream")
    ours, _, _ = export.load_trained(run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    ids = torch.randint(1, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits.float(), ours(ids).logits.float(), rtol=2e-2, atol=2e-2)
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["bigadapt_merged"]["step"] == 3


def test_methods_that_add_modules_refuse_before_reading_weights(tmp_path, monkeypatch):
    run = train(tmp_path, "gpt2", "fp32", "causal_lm", {"name": "adapter_h", "r": 4})
    from bigadapt import merge_stream
    monkeypatch.setattr(merge_stream, "find_source", lambda *_: pytest.fail("read the base"))
    with pytest.raises(BigadaptError, match="adapter_h: adapters cannot be merged"):
        export.merged(run, tmp_path / "out")
