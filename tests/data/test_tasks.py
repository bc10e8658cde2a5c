"""The paper's tasks as data modules, on the shared files, with the byte fallback tokenizer (offline)."""
import glob
import os
import subprocess
import sys

import pytest

from bigadapt.config import config_from_dict, load_config
from bigadapt.data import TASKS, build_task
from bigadapt.data.e2e import load_e2e
from bigadapt.data.tasks import SEPARATOR, encode_prompts, subset_indices
from bigadapt.data.tokenizer import ByteTokenizer
from bigadapt.errors import ConfigError, DataError
from tests.conftest import REPO, TINY_GPT2, env, tiny_config

VOCAB = TINY_GPT2["vocab_size"]


def cfg_for(task: str, objective: str = "seq_cls", num_labels: int = 2, **data):
    model = {"arch": dict(TINY_GPT2), "objective": objective, "num_labels": num_labels}
    return config_from_dict(tiny_config("unused", model=model, data=dict(task=task, seq_len=64, **data)))


@pytest.mark.parametrize("task,train,dev,labels", [
    ("mrpc", 3668, 408, 2), ("cola", 8551, 1043, 2), ("stsb", 5749, 1500, 1), ("rte", 2490, 277, 2),
    ("sst2", 67349, 872, 2)])
def test_glue_counts(shared_data, task, train, dev, labels):
    data = build_task(cfg_for(f"glue/{task}", num_labels=labels), VOCAB)
    assert (len(data.train), len(data.eval), data.objective, data.num_labels) == (train, dev, "seq_cls", labels)
    assert all(len(e["input_ids"]) <= 64 for e in data.train)


def test_fractions_are_nested_and_deterministic(shared_data):
    sizes = {f: subset_indices(3668, f, 0, seed=0) for f in (0.1, 0.3, 0.5, 1.0)}
    assert [len(v) for v in sizes.values()] == [367, 1100, 1834, 3668]
    assert set(sizes[0.1]) < set(sizes[0.3]) < set(sizes[0.5]) < set(sizes[1.0])
    assert subset_indices(3668, 0.3, 0, seed=0) == sizes[0.3]  # same seed, same subset
    assert subset_indices(3668, 0.3, 0, seed=1) != sizes[0.3]
    assert set(subset_indices(3668, 1.0, 100, 0)) < set(subset_indices(3668, 1.0, 1000, 0))  # MNLI-n style
    tenth = build_task(cfg_for("glue/mrpc", fraction=0.1), VOCAB).train
    third = build_task(cfg_for("glue/mrpc", fraction=0.3), VOCAB).train
    assert len(tenth) == 367 and all(e in third for e in tenth)
    assert len(build_task(cfg_for("glue/mrpc", max_examples=100), VOCAB).train) == 100


def test_fallback_tokenizer_pairs_and_truncation(shared_data):
    tok = ByteTokenizer(300)
    ids = tok("ab", "c")["input_ids"]
    assert ids == [1, 3 + 97, 3 + 98, 2, 3 + 99, 2]  # [cls] a [sep] b [sep]
    assert tok.decode(tok.encode("Café ||")) == "Café ||"  # exact with >= 259 ids
    long = tok("x" * 50, "y" * 10, truncation=True, max_length=20)["input_ids"]
    # longest first: the long text is cut down to the short one, then both lose tokens in turn
    assert len(long) == 20 and (long.count(3 + ord("x")), long.count(3 + ord("y"))) == (8, 9)
    example = build_task(cfg_for("glue/mrpc"), VOCAB).train[0]
    assert example["input_ids"][0] == 1 and example["input_ids"].count(2) == 2 and example["label"] == 1


def test_regression_labels_are_float(shared_data):
    data = build_task(cfg_for("glue/stsb", num_labels=1, max_examples=50), VOCAB)
    assert all(isinstance(e["label"], float) for e in data.train + data.eval)
    assert {type(e["label"]) for e in build_task(cfg_for("glue/rte"), VOCAB).eval} == {int}


def test_e2e_loss_from(shared_data):
    cfg = cfg_for("e2e", "causal_lm", fraction=0.01)
    cfg.data.seq_len = 512
    tok = ByteTokenizer(VOCAB)
    data = build_task(cfg, VOCAB, tok)
    assert (len(data.train), len(data.eval), data.objective) == (421, 4672, "causal_lm")
    first = load_e2e("valid")[0]
    example = data.eval[0]
    prompt = encode_prompts([first["mr"]], tok, 512)[0]
    assert example["input_ids"][:example["loss_from"]] == prompt
    assert example["input_ids"][example["loss_from"]:] == tok.encode(" " + first["ref"].strip()) + [0]  # + eos
    assert prompt[-4:] == tok.encode(SEPARATOR) + [2]  # the fallback wraps the prompt in [cls] ... [sep]
    short = build_task(cfg_for("e2e", "causal_lm", max_examples=10), VOCAB).train
    assert all(len(e["input_ids"]) == 64 and e["loss_from"] == 63 for e in short)  # >= 1 target token survives


def test_user_errors_are_one_line(shared_data, tmp_path):
    with pytest.raises(ConfigError, match="model.num_labels=2: task glue/stsb has 1"):
        build_task(cfg_for("glue/stsb"), VOCAB)
    with pytest.raises(ConfigError, match="model.objective='seq_cls': task e2e needs causal_lm"):
        build_task(cfg_for("e2e"), VOCAB)
    with pytest.raises(DataError, match="expected a GLUE folder named MRPC"):
        build_task(cfg_for("glue/mrpc", path=str(tmp_path)), VOCAB)
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "train.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\n1\t1\t2\ta\n")
    with pytest.raises(DataError, match="missing column '#2 String'"):
        build_task(cfg_for("glue/mrpc", path=str(tmp_path)), VOCAB)
    for bad in ({"fraction": 0.0}, {"fraction": 1.5}, {"max_examples": -1}):
        with pytest.raises(ConfigError, match=f"data.{next(iter(bad))}"):
            cfg_for("glue/mrpc", **bad)
    with pytest.raises(ConfigError, match="glue/mrpc"):
        cfg_for("glue/nope")


def test_hub_tasks_fail_offline_with_one_line():
    code = ("from bigadapt.data import build_task; from tests.data.test_tasks import cfg_for\n"
            "build_task(cfg_for('samsum', 'causal_lm'), 96)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(env(), HF_DATASETS_OFFLINE="1"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("bigadapt.errors.DataError: data.task=samsum")
    assert "pass data.path" in last


def test_every_registered_task_and_config_loads():
    assert {"glue/mrpc", "glue/cola", "glue/stsb", "glue/rte", "glue/sst2", "glue/mnli", "e2e", "wikisql",
            "samsum", "web_nlg", "dart", "e2e_nlg"} <= set(TASKS)
    files = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    tasks = {load_config(f).data.task for f in files}
    assert {"glue/mrpc", "glue/cola", "glue/stsb", "glue/rte", "glue/sst2", "glue/mnli", "e2e", "wikisql",
            "samsum"} <= tasks


def test_bert_sentence_pairs_carry_segment_ids(tmp_path):
    """BERT embeds which sentence each token belongs to; pairs must reach the model with token_type_ids."""
    from transformers import BertTokenizerFast

    from bigadapt.data.batching import collate
    from bigadapt.data.tasks import encode_glue
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat",
                                                   "sat", "a", "dog"]))
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    pairs = encode_glue([{"text_a": "the cat", "text_b": "a dog sat", "label": 1},
                         {"text_a": "cat", "text_b": "dog", "label": 0}], tok, 16, False)
    assert pairs[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]  # [CLS] the cat [SEP] | a dog sat [SEP]
    batch = collate(pairs, "seq_cls", pad_id=0)
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]]
    single = encode_glue([{"text_a": "the cat", "text_b": None, "label": 0}], tok, 16, False)
    assert "token_type_ids" not in single[0] and "token_type_ids" not in collate(single, "seq_cls", 0)
