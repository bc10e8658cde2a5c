"""The hub NLG tasks' ids, read as current `datasets` reads them, without the network.

A loading-script repository is read from the Hub's parquet conversion (`refs/convert/parquet`): one folder per
config, one per split (named as the script named it: WebNLG 2017 has `dev`), `0000.parquet` inside, the features
in the files' `huggingface` metadata as the converter wrote them (datasets 2.x JSON, `Sequence` of a dict = a
struct of lists). These tests write that layout with the scripts' own feature declarations and real-looking rows,
then call the real `datasets.load_dataset` with exactly the keywords `_hub` passes, only the repository id
swapped for the local folder (the Hub's part, file listing and download, is what cannot run here).
"""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.table import InMemoryTable

from bigadapt.data.tasks import _HUB_NLG, GLUE_HUB, PARQUET, WEBNLG_TEST_FILE, generation_pairs, source_categories
from bigadapt.errors import DataError
from tests.data.test_tasks import cfg_for

STR, I32, BOOL = ({"dtype": d, "_type": "Value"} for d in ("string", "int32", "bool"))
ARROW = {"string": pa.string(), "int32": pa.int32(), "bool": pa.bool_()}


def seq(feature) -> dict:
    return {"feature": feature, "length": -1, "_type": "Sequence"}


def arrow_type(feature) -> pa.DataType:
    """The arrow type datasets 2.x gave a feature (what the converter wrote): a Sequence of a dict is a struct of
    lists. (datasets 5 reads such a declaration differently when a sub-feature is itself a Sequence, so the files
    are written from the declaration, not through today's Features.)"""
    if feature.get("_type") == "Value":
        return ARROW[feature["dtype"]]
    if feature.get("_type") == "Sequence":
        inner = feature["feature"]
        if "_type" not in inner:
            return pa.struct({k: pa.list_(arrow_type(v)) for k, v in inner.items()})
        return pa.list_(arrow_type(inner))
    return pa.struct({k: arrow_type(v) for k, v in feature.items()})


# the features each script declared (huggingface/datasets' datasets/<name>/<name>.py before the move to the Hub)
FEATURES = {
    "e2e_nlg": {"meaning_representation": STR, "human_reference": STR},
    "web_nlg": {"category": STR, "size": I32, "eid": STR, "original_triple_sets": seq({"otriple_set": seq(STR)}),
                "modified_triple_sets": seq({"mtriple_set": seq(STR)}), "shape": STR, "shape_type": STR,
                "lex": seq({"comment": STR, "lid": STR, "text": STR, "lang": STR}), "test_category": STR,
                "dbpedia_links": seq(STR), "links": seq(STR)},
    "dart": {"tripleset": seq(seq(STR)), "subtree_was_extended": BOOL,
             "annotations": seq({"source": STR, "text": STR})},
    "wikisql": {"phase": I32, "question": STR,
                "table": {"header": seq(STR), "page_title": STR, "page_id": STR, "types": seq(STR), "id": STR,
                          "section_title": STR, "caption": STR, "rows": seq(seq(STR)), "name": STR},
                "sql": {"human_readable": STR, "sel": I32, "agg": I32,
                        "conds": seq({"column_index": I32, "operator_index": I32, "condition": STR})}},
    "samsum": {"id": STR, "dialogue": STR, "summary": STR},
}


def webnlg_row(category, triples, texts, test_category="", comments=None, eid="Id1"):
    n = len(texts)
    return {"category": category, "size": len(triples), "eid": eid,
            "original_triple_sets": {"otriple_set": [triples]}, "modified_triple_sets": {"mtriple_set": [triples]},
            "shape": "", "shape_type": "", "test_category": test_category, "dbpedia_links": [], "links": [],
            "lex": {"comment": comments or ["good"] * n, "lid": [f"Id{i + 1}" for i in range(n)], "text": texts,
                    "lang": [""] * n}}


# one row per task as the script yielded it, and what the converter must make of it
ROWS = {
    "e2e_nlg": ({"meaning_representation": "name[Aromi], food[Thai]", "human_reference": "Aromi serves Thai."},
                ("name[Aromi], food[Thai]", ["Aromi serves Thai."])),
    "web_nlg": (webnlg_row("Airport", ["Aarhus_Airport | cityServed | \"Aarhus, Denmark\"",
                                       "Aarhus_Airport | elevationAboveTheSeaLevel_(in_metres) | 25.0"],
                           ["Aarhus Airport serves Aarhus, Denmark.", "It is 25 metres above sea level."]),
                ("Aarhus_Airport : cityServed : \"Aarhus, Denmark\" | "
                 "Aarhus_Airport : elevationAboveTheSeaLevel_(in_metres) : 25.0",
                 ["Aarhus Airport serves Aarhus, Denmark.", "It is 25 metres above sea level."])),
    "dart": ({"tripleset": [["Mars", "ORBITS", "Sun"], ["Mars", "[TITLE]", "Planets"]], "subtree_was_extended": None,
              "annotations": {"source": ["WikiTableQuestions_mturk"], "text": ["Mars orbits the Sun."]}},
             ("Mars : orbits : Sun | Mars : [title] : Planets", ["Mars orbits the Sun."])),
    "wikisql": ({"phase": 1, "question": "who won in 1990?",
                 "table": {"header": ["Year", "Winner"], "page_title": "", "page_id": "", "types": ["real", "text"],
                           "id": "1-1000181-1", "section_title": "", "caption": "", "rows": [["1990", "Ann"]],
                           "name": "table_1000181_1"},
                 "sql": {"human_readable": "SELECT Winner FROM table WHERE Year = 1990", "sel": 1, "agg": 0,
                         "conds": {"column_index": [0], "operator_index": [0], "condition": ["1990"]}}},
                ("table: Year | Winner question: who won in 1990?", ["SELECT Winner FROM table WHERE Year = 1990"])),
    "samsum": ({"id": "13818513", "dialogue": "Amanda: I baked cookies.\nJerry: Sure!",
                "summary": "Amanda baked cookies."},
               ("Amanda: I baked cookies.\nJerry: Sure!", ["Amanda baked cookies."])),
}


def arrow_table(task, rows) -> pa.Table:
    schema = pa.schema({k: arrow_type(v) for k, v in FEATURES[task].items()},
                       metadata={"huggingface": json.dumps({"info": {"features": FEATURES[task]}})})
    return pa.Table.from_pylist(rows, schema=schema)


def write_conversion(root, task, splits: dict[str, list[dict]]):
    """The parquet conversion of `task`'s repository: root/<config>/<split folder>/0000.parquet."""
    for folder, rows in splits.items():
        out = root / _HUB_NLG[task][0].config / folder
        out.mkdir(parents=True)
        pq.write_table(arrow_table(task, rows), out / "0000.parquet")


@pytest.fixture
def hub_is(monkeypatch, tmp_path):
    """`datasets.load_dataset` answering for the Hub from a local folder: it checks the id and keywords `_hub`
    passes and reads the folder with the same keywords (the revision names the Hub's branch, nothing local)."""
    import datasets
    real, calls = datasets.load_dataset, []

    def serve(root):
        def load(path, split=None, **kwargs):
            calls.append((path, split, dict(kwargs)))
            assert kwargs.pop("revision") == PARQUET
            return real(str(root), split=split, cache_dir=str(tmp_path / "cache"), **kwargs)
        monkeypatch.setattr(datasets, "load_dataset", load)
        return calls
    return serve


@pytest.mark.parametrize("task", [t for t, (hub, _) in _HUB_NLG.items() if hub.revision == PARQUET])
def test_script_repositories_load_from_their_parquet_conversion(tmp_path, hub_is, task):
    hub = _HUB_NLG[task][0]
    row, (source, refs) = ROWS[task]
    dev = "dev" if task == "web_nlg" else "validation"  # the folder is the script's split name
    write_conversion(tmp_path / "hub", task, {"train": [row, row], dev: [row], "test": [row]})
    calls = hub_is(tmp_path / "hub")
    cfg = cfg_for(task, "causal_lm")
    assert generation_pairs(task, "train", cfg) == [(source, refs + refs)]  # one source, its references gathered
    assert generation_pairs(task, "dev", cfg) == [(source, refs)]  # `dev/` is read as the validation split
    assert calls == [(hub.repo, "train", {"data_dir": hub.config, "revision": PARQUET}),
                     (hub.repo, "validation", {"data_dir": hub.config, "revision": PARQUET})]


def test_every_id_is_namespaced_and_every_converter_takes_its_real_rows():
    import datasets
    assert GLUE_HUB == "nyu-mll/glue" and set(ROWS) == set(_HUB_NLG)
    for task, (hub, convert) in _HUB_NLG.items():
        owner, _, name = hub.repo.partition("/")
        assert owner and name and "/" not in name, hub.repo
        assert hub.revision in (None, PARQUET) and (hub.revision is None or hub.config)
        row, expected = ROWS[task]
        typed = datasets.Dataset(InMemoryTable(arrow_table(task, [row])))[0]  # as datasets returns the row
        assert convert(typed) == expected, task


def test_webnlg_2017_test_split_seen_and_unseen(tmp_path):
    """The 2017 release as a local copy of its parquet conversion (data.path): the test split's three files
    reduce to the 1,862-input file with references, and seen = the categories of the training split."""
    seen_rows = [webnlg_row(c, [f"{c}_1 | p | o"], [f"{c} text."]) for c in ("Airport", "Astronaut", "City")]
    airport = webnlg_row("Airport", ["Aarhus_Airport | runwayLength | 2702.0"],
                         ["The runway is 2702 long.", "bad text", "Its runway: 2702."], WEBNLG_TEST_FILE,
                         comments=["good", "toFix", "good"])
    athlete = webnlg_row("Athlete", ["Ann_Lee | club | FC_Z"], ["Ann Lee plays for FC Z."], WEBNLG_TEST_FILE)
    test = [dict(airport, test_category="testdata_no_lex", lex={k: [] for k in airport["lex"]}),
            dict(athlete, test_category="testdata_no_lex", lex={k: [] for k in athlete["lex"]}),
            dict(athlete, test_category="testdata_unseen_with_lex"), airport, athlete]
    write_conversion(tmp_path, "web_nlg", {"train": seen_rows, "dev": seen_rows[:1], "test": test})
    cfg = cfg_for("web_nlg", "causal_lm", path=str(tmp_path))
    pairs = generation_pairs("web_nlg", "test", cfg)
    assert pairs == [("Aarhus_Airport : runwayLength : 2702.0", ["The runway is 2702 long.", "Its runway: 2702."]),
                     ("Ann_Lee : club : FC_Z", ["Ann Lee plays for FC Z."])]  # no duplicate, no empty, no toFix
    seen = set(source_categories("web_nlg", "train", cfg).values())
    category = source_categories("web_nlg", "test", cfg)
    assert seen == {"Airport", "Astronaut", "City"}
    assert ["S" if category.get(s) in seen else "U" for s, _ in pairs] == ["S", "U"]  # as bigadapt.evaluate groups


def test_script_repository_and_offline_hub_are_one_line(tmp_path, monkeypatch):
    import datasets
    clone = tmp_path / "web_nlg"  # a clone of the script repository's main branch
    clone.mkdir()
    (clone / "web_nlg.py").write_text("import datasets\n")
    with pytest.raises(DataError) as e:
        generation_pairs("web_nlg", "train", cfg_for("web_nlg", "causal_lm", path=str(clone)))
    assert "Dataset scripts are no longer supported" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        generation_pairs("dart", "train", cfg_for("dart", "causal_lm"))
    assert str(e.value).startswith("data.task=dart: cannot load 'Yale-LILY/dart'") and "\n" not in str(e.value)
    assert "pass data.path" in str(e.value)
