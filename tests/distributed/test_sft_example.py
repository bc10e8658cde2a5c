"""The worked example of docs/sft.md, end to end on this machine: chat-formatted JSONL, the shipped
configs/llama-sft-chat.yaml pointed at a local LLaMA-style base (tiny, random init, with a BPE tokenizer trained
here and given a chat template), trained on 2 ranks under ZeRO-3 through the deepspeed launcher, then
`bigadapt generate` on the result, sharded over 2 ranks and in one process."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.bpe import CHAT_SPECIALS, CHAT_TEMPLATE, train_bpe
from tests.conftest import REPO, TINY_LLAMA, check, launch, metrics, run_cli

pytestmark = pytest.mark.distributed

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def chats(n: int, seed: int) -> list[dict]:
    """'what comes after three' -> 'four': a task a tiny LoRA-adapted model can start to learn in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(9)
        rows.append({"messages": [{"role": "system", "content": "answer in one word"},
                                  {"role": "user", "content": f"what comes after {WORDS[i]}"},
                                  {"role": "assistant", "content": WORDS[i + 1]}]})
    return rows


def llama_base(folder: Path) -> Path:
    """A local model directory as a user's would be: config.json, safetensors and the tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM
    corpus = [" ".join(m["content"] for m in r["messages"]) for r in chats(200, 1)]
    tok = train_bpe(folder, corpus, 320, CHAT_SPECIALS, "<eos>", unk="<unk>", chat_template=CHAT_TEMPLATE)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config = LlamaConfig(**dict(arch, vocab_size=len(tok), max_position_embeddings=128,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, bos_token_id=None))
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_sft_chat_example_on_two_ranks_then_generate(tmp_path):
    base = llama_base(tmp_path / "base")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chats(400, 0)))
    run = tmp_path / "run"
    sets = {"run_dir": run, "model.name_or_path": base, "model.dtype": "fp32", "data.path": data,
            "data.seq_len": 128, "train.batch_size": 16, "train.micro_batch": 4, "train.lr": 5e-3,
            "train.epochs": 0, "train.max_steps": 40, "train.eval_every": 20, "train.save_every": 20,
            "train.log_every": 1, "method.dropout": 0.0, "zero.param_persistence_threshold": 0}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = check(launch(2, "--config", str(REPO / "configs/llama-sft-chat.yaml"), *args, timeout=600))
    out = proc.stdout + proc.stderr
    assert "ZeRO stage 3, 2 rank(s)" in out and "data sft from" in out

    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    evals = [m["eval_loss"] for m in metrics(run) if m.get("split") == "eval"]
    assert len(losses) == 40
    # a random-init base learns the answers slowly: ~5.5 over the first 5 steps, ~4.8 over the last 5 here
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert evals[-1] < evals[0], evals

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what comes after {w}"}]})
                               + "\n" for w in WORDS[:4]))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    check(launch(2, "generate", str(run), "--file", str(prompts), "--out", str(two), "--max-new-tokens", "4",
                 script="launch/bigadapt.py"))
    check(run_cli("generate", str(run), "--file", str(prompts), "--out", str(one), "--max-new-tokens", "4"))
    sharded = [json.loads(line)["output"] for line in two.read_text().splitlines()]
    single = [json.loads(line)["output"] for line in one.read_text().splitlines()]
    assert sharded == single and len(single) == 4
