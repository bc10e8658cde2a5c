from collections import Counter
from pathlib import Path

import pytest

from bigadapt.data.glue import GLUE_TASKS, glue_task, load_glue
from bigadapt.errors import ConfigError, DataError

# Official GLUE train/dev sizes (also checked in shared/data/README.md).
SIZES = [("mrpc", 3668, 408), ("cola", 8551, 1043), ("stsb", 5749, 1500), ("rte", 2490, 277), ("sst2", 67349, 872)]


@pytest.mark.parametrize("task,train,dev", SIZES)
def test_split_sizes(shared_data, task, train, dev):
    assert len(load_glue(task, "train", shared_data / "glue")) == train
    assert len(load_glue(task, "dev", shared_data / "glue")) == dev


@pytest.mark.parametrize("task,split,counts", [
    ("mrpc", "train", {1: 2474, 0: 1194}), ("mrpc", "dev", {1: 279, 0: 129}),
    ("sst2", "train", {1: 37569, 0: 29780}), ("sst2", "dev", {1: 444, 0: 428}),
])
def test_published_label_counts(shared_data, task, split, counts):
    assert Counter(r["label"] for r in load_glue(task, split, shared_data / "glue")) == counts


def test_record_shapes(shared_data):
    glue = shared_data / "glue"
    mrpc = load_glue("MRPC", "train", glue)[0]  # the BOM must not leak into the header or the text
    assert mrpc["text_a"].startswith("Amrozi accused his brother") and mrpc["label"] == 1
    assert load_glue("cola", "train", glue)[0] == {  # headerless file: the first line is data
        "text_a": "Our friends won't buy this analysis, let alone the next one we propose.", "text_b": None, "label": 1}
    assert load_glue("sst-2", "dev", glue)[0]["text_a"] == "it 's a charming and often affecting journey . "
    stsb = load_glue("STS-B", "dev", glue)
    assert all(isinstance(r["label"], float) and 0 <= r["label"] <= 5 for r in stsb)
    assert {r["label"] for r in load_glue("rte", "dev", glue)} == {0, 1}  # "entailment" -> 0


def test_test_splits_have_no_labels(shared_data):
    test = load_glue("mrpc", "test", shared_data / "glue")
    assert len(test) == 1725 and all(r["label"] is None and r["text_b"] for r in test)
    assert len(load_glue("stsb", "test", shared_data / "glue")) == 1379
    assert len(load_glue("rte", "test", shared_data / "glue")) == 3000


def test_task_table():
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["cola"].metrics == ("mcc",) and GLUE_TASKS["mrpc"].metrics == ("accuracy", "f1")
    assert glue_task("SST-2") is glue_task("sst_2") is GLUE_TASKS["sst2"]
    with pytest.raises(ConfigError, match="unknown GLUE task 'wnli2'; known tasks: mnli, sst2, mrpc, cola"):
        glue_task("wnli2")
    with pytest.raises(ConfigError, match="dev_matched"):
        load_glue("mnli", "dev", "/nonexistent")


def _write(root: Path, folder: str, name: str, lines: list[str]) -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    path = root / folder / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _one_line_error(task: str, split: str, root: Path) -> str:
    with pytest.raises(DataError) as info:
        load_glue(task, split, root)
    message = str(info.value)
    assert "\n" not in message
    return message


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def test_missing_column(tmp_path):
    path = _write(tmp_path, "MRPC", "train.tsv", ["#1 ID\t#2 ID\t#1 String\t#2 String", "1\t2\ta\tb"])
    assert _one_line_error("mrpc", "train", tmp_path).startswith(f"{path}:1: missing column 'Quality'")


def test_bad_label(tmp_path):
    path = _write(tmp_path, "MRPC", "train.tsv", [MRPC_HEADER, "1\t1\t2\ta\tb", "yes\t3\t4\tc\td"])
    assert _one_line_error("mrpc", "train", tmp_path).startswith(f"{path}:3: label 'yes' is neither 0..1")


def test_label_out_of_range(tmp_path):
    path = _write(tmp_path, "MRPC", "dev.tsv", [MRPC_HEADER, "1\t1\t2\ta\tb", "2\t3\t4\tc\td"])
    assert _one_line_error("mrpc", "dev", tmp_path) == f"{path}:3: label 2 is out of range 0..1"


def test_headerless_line_numbers_and_column_count(tmp_path):
    path = _write(tmp_path, "CoLA", "train.tsv", ["gj04\t1\t\tFine.", "gj04\t0\t*"])
    assert _one_line_error("cola", "train", tmp_path) == f"{path}:2: expected 4 tab-separated columns, found 3"


def test_score_out_of_range(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    path = _write(tmp_path, "STS-B", "train.tsv", [header, "0\tg\tf\ty\t0\ts\ts\ta\tb\t5.5"])
    assert _one_line_error("stsb", "train", tmp_path) == f"{path}:2: score 5.5 is outside [0.0, 5.0]"


def test_missing_file_names_the_path(tmp_path):
    assert str(tmp_path / "RTE" / "dev.tsv") in _one_line_error("rte", "dev", tmp_path)


def test_quotes_are_literal_text(tmp_path):
    # csv.QUOTE_NONE: a leading quote does not swallow the tab that follows
    _write(tmp_path, "RTE", "dev.tsv", ["index\tsentence1\tsentence2\tlabel", '0\t"Hi,\tthere"\tnot_entailment'])
    assert load_glue("rte", "dev", tmp_path) == [{"text_a": '"Hi,', "text_b": 'there"', "label": 1}]


def test_layouts_of_tasks_not_in_shared_data(tmp_path):
    # MNLI, QNLI, QQP as GLUE ships them (columns by header name; MNLI's label is the last column)
    mnli = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
           "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    _write(tmp_path, "MNLI", "dev_matched.tsv", [mnli, "0\t1\t1e\tfiction\t(\t(\t(\t(\tP.\tH.\tneutral\tcontradiction"])
    _write(tmp_path, "QNLI", "test.tsv", ["index\tquestion\tsentence", "0\tWhy?\tBecause."])
    _write(tmp_path, "QQP", "train.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tA?\tB?\t1"])
    assert load_glue("mnli", "dev_matched", tmp_path) == [{"text_a": "P.", "text_b": "H.", "label": 2}]
    assert load_glue("qnli", "test", tmp_path) == [{"text_a": "Why?", "text_b": "Because.", "label": None}]
    assert load_glue("qqp", "train", tmp_path) == [{"text_a": "A?", "text_b": "B?", "label": 1}]
