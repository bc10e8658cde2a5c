"""The hub NLG tasks (e2e_nlg, web_nlg, dart, wikisql, samsum) from local copies in the hub's row layout:
per-split JSON Lines files and a `save_to_disk` DatasetDict, as an offline user would bring them."""
import json

import pytest

from bigadapt.data import build_task
from bigadapt.data.tasks import generation_pairs
from bigadapt.errors import DataError
from tests.data.test_tasks import VOCAB, cfg_for

# two rows per task in the hub's layout; the first two share a source where the hub repeats it per reference
ROWS = {
    "e2e_nlg": [{"meaning_representation": "name[Aromi], food[Thai]", "human_reference": "Aromi serves Thai."},
                {"meaning_representation": "name[Aromi], food[Thai]", "human_reference": "Thai food at Aromi."}],
    "web_nlg": [{"modified_triple_sets": {"mtriple_set": [["Aarhus | leader | Jacob", "Aarhus | country | DK"]]},
                 "lex": {"text": ["Jacob leads Aarhus, in DK.", "Aarhus (DK) is led by Jacob."]}}],
    "dart": [{"tripleset": [["Mars", "ORBITS", "Sun"]], "annotations": {"text": ["Mars orbits the Sun."]}}],
    "wikisql": [{"question": "who won in 1990?", "table": {"header": ["year", "winner"]},
                 "sql": {"human_readable": "SELECT winner FROM table WHERE year = 1990"}}],
    "samsum": [{"dialogue": "A: hi\nB: lunch?", "summary": "B asks A to lunch."}],
}
# the sources as microsoft/LoRA writes them (src/format_converting_{webnlg,dart}.py)
SOURCES = {
    "e2e_nlg": ("name[Aromi], food[Thai]", 2), "web_nlg": ("Aarhus : leader : Jacob | Aarhus : country : DK", 2),
    "dart": ("Mars : orbits : Sun", 1), "wikisql": ("table: year | winner question: who won in 1990?", 1),
    "samsum": ("A: hi\nB: lunch?", 1),
}


def _write_jsonl(folder, stem, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("task", sorted(ROWS))
def test_per_split_json_lines(tmp_path, task):
    _write_jsonl(tmp_path, "train", ROWS[task])
    _write_jsonl(tmp_path, "dev", ROWS[task][:1])  # dev/valid/validation all name the validation split
    cfg = cfg_for(task, "causal_lm", path=str(tmp_path))
    source, n_refs = SOURCES[task]
    pairs = generation_pairs(task, "train", cfg)
    assert pairs[0][0] == source and len(pairs[0][1]) == n_refs and len(pairs) == 1
    data = build_task(cfg, VOCAB)
    assert len(data.train) == n_refs and all(0 < e["loss_from"] < len(e["input_ids"]) for e in data.train)
    assert len(data.eval) == len(generation_pairs(task, "dev", cfg)[0][1])


def test_webnlg_categories_for_seen_and_unseen(tmp_path):
    from bigadapt.data.tasks import source_categories
    row = dict(ROWS["web_nlg"][0], category="City")
    _write_jsonl(tmp_path, "train", [row])
    cats = source_categories("web_nlg", "train", cfg_for("web_nlg", "causal_lm", path=str(tmp_path)))
    assert cats == {SOURCES["web_nlg"][0]: "City"}
    assert source_categories("dart", "train", cfg_for("dart", "causal_lm", path=str(tmp_path))) == {}


def test_saved_dataset_dict(tmp_path):
    import datasets
    rows = ROWS["samsum"] * 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "s"))
    data = build_task(cfg_for("samsum", "causal_lm", path=str(tmp_path / "s")), VOCAB)
    assert len(data.train) == 3 and len(data.eval) == 1
    with pytest.raises(DataError, match=r"splits \['train', 'validation'\], not 'test'"):
        generation_pairs("samsum", "test", cfg_for("samsum", "causal_lm", path=str(tmp_path / "s")))


def test_bad_local_copies_are_one_line(tmp_path):
    _write_jsonl(tmp_path / "a", "train", [{"dialogue": "x"}])  # no summary
    with pytest.raises(DataError) as e:
        generation_pairs("samsum", "train", cfg_for("samsum", "causal_lm", path=str(tmp_path / "a")))
    assert "row 0" in str(e.value) and "'summary'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="no file for split 'validation'.*validation.jsonl"):
        generation_pairs("samsum", "dev", cfg_for("samsum", "causal_lm", path=str(tmp_path / "a")))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.json").write_text("{not json")
    with pytest.raises(DataError, match=r"train.json: cannot be read as json"):
        generation_pairs("samsum", "train", cfg_for("samsum", "causal_lm", path=str(tmp_path / "b")))
