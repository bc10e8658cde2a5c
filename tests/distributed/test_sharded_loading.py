"""Invariant 1 while loading: under ZeRO-3 each rank reads only its own partitions from the safetensors shards
(bigadapt.loading), and the weights are transformers' from_pretrained's, bit for bit, on 1 and 2 real ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ..conftest import REPO, check, launch

pytestmark = pytest.mark.distributed
SCRIPT = str(Path(__file__).with_name("sharded_loading_check.py").relative_to(REPO))


def _save(directory: Path, model_type: str, auto_name: str, dtype: torch.dtype, shard: str, **arch) -> Path:
    import transformers
    from transformers import AutoConfig
    torch.manual_seed(0)
    model = getattr(transformers, auto_name).from_config(AutoConfig.for_model(model_type, **arch), dtype=dtype)
    model.save_pretrained(directory, max_shard_size=shard)
    return directory


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Odd sizes, so partitions end mid-row: a tied LLaMA in fp32 (11 shards + index), a BertModel in fp16 saved
    without the `bert.` prefix its classifier expects, a single-file GPT-2 lacking the classifier's score."""
    root = tmp_path_factory.mktemp("bases")
    llama = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=True)
    return {
        "llama": _save(root / "llama", "llama", "AutoModelForCausalLM", torch.float32, "40KB", **llama),
        "bert": _save(root / "bert", "bert", "AutoModel", torch.float16, "30KB", num_hidden_layers=2,
                      hidden_size=36, num_attention_heads=4, intermediate_size=72, vocab_size=101,
                      max_position_embeddings=64),
        "gpt2": _save(root / "gpt2", "gpt2", "AutoModelForCausalLM", torch.bfloat16, "10MB", n_layer=2, n_embd=36,
                      n_head=4, vocab_size=101, n_positions=64, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    }


# each case on 2 ranks (1 rank holds whole tensors: the trivial partition), one cast per case: fp32 -> bf16 with
# ties, fp16 kept with a missing prefix and head, bf16 -> fp32 single file (tests/test_loading.py cuts every range)
CASES = [("llama", "causal_lm", "bf16", 2), ("bert", "seq_cls", "fp16", 2), ("gpt2", "seq_cls", "fp32", 2)]


@pytest.mark.parametrize("name,objective,dtype,ranks", CASES)
def test_sharded_reader_equals_from_pretrained(bases, tmp_path, name, objective, dtype, ranks):
    out = tmp_path / "out.json"
    check(launch(ranks, str(bases[name]), objective, dtype, str(out), script=SCRIPT))
    results = json.loads(out.read_text())
    assert len(results) == ranks
    for r in results:
        assert r["differ"] == [] and r["extra"] == [], r  # every parameter and buffer, bit for bit
        assert r["fallback_lines"] == [], r  # the sharded reader did the loading, not transformers
        assert r["dtypes"] == [f"torch.{ {'bf16': 'bfloat16', 'fp16': 'float16', 'fp32': 'float32'}[dtype]}"]
        assert r["new_modules"][0] == r["new_modules"][1]  # the fresh head reported as from_pretrained's
        # each rank stores its share of the base, never all of it (padding: under one element per tensor)
        assert abs(r["partition_numel"] - r["whole_numel"] / ranks) <= r["n"], r
    new = results[0]["new_modules"][0]
    assert new == {"llama": [], "bert": ["classifier"], "gpt2": ["score"]}[name]
    assert results[0]["tied"] == (name == "llama")
