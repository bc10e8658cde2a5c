import pytest

from bigadapt.data.e2e import group_references, load_e2e
from bigadapt.errors import ConfigError, DataError


@pytest.mark.parametrize("split,lines,mrs", [("train", 42061, 4862), ("valid", 4672, 547), ("test", 4693, 630)])
def test_counts(shared_data, split, lines, mrs):
    records = load_e2e(split, shared_data / "e2e")
    assert len(records) == lines
    groups = group_references(records)
    assert len(groups) == mrs and sum(len(refs) for _, refs in groups) == lines


def test_first_record(shared_data):
    first = load_e2e("train", shared_data / "e2e")[0]
    assert first["mr"].startswith("name : The Vaults | Type : pub | price : more than £ 30")
    assert first["ref"] == "The Vaults pub near Café Adriatic has a 5 star rating . Prices start at £ 30 ."


def test_grouping_keeps_first_appearance_order():
    records = [{"mr": m, "ref": r} for m, r in [("B", "b1"), ("A", "a1"), ("B", "b2"), ("C", "c1"), ("A", "a2")]]
    assert group_references(records) == [("B", ["b1", "b2"]), ("A", ["a1", "a2"]), ("C", ["c1"])]


@pytest.mark.parametrize("line,problem", [
    ("name : X no separator", "expected 'MR||reference', found 0 '||' separators"),
    ("name : X||one||two", "expected 'MR||reference', found 2 '||' separators"),
    ("||a reference", "empty MR"),
])
def test_malformed_line(tmp_path, line, problem):
    path = tmp_path / "valid.txt"
    path.write_text(f"name : X||fine\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_e2e("valid", tmp_path)
    assert str(info.value) == f"{path}:2: {problem}"


def test_unknown_split():
    with pytest.raises(ConfigError, match="splits: train, valid, test"):
        load_e2e("dev")
