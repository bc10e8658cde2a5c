"""`bigadapt export` and `bigadapt merge` never write into a non-empty output directory unless asked (issue 21: both
silently replaced what was there). The refusal comes before the run is read, so no trained run is needed here; the
CLI path with a real run is tests/test_generate.py::test_merge_directory_serves_as_is."""
from __future__ import annotations

import pytest

from bigadapt import export
from bigadapt.errors import CheckpointError


@pytest.mark.parametrize("write", [export.to_peft, export.merged], ids=["export", "merge"])
def test_a_non_empty_output_directory_is_refused_and_left_as_it_was(tmp_path, write):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("a user's file")
    with pytest.raises(CheckpointError, match="out: is not empty; choose a new directory or pass --overwrite"):
        write(tmp_path / "run", out)
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("adapter_config.json", "a user's file")]


def test_a_file_where_the_output_directory_goes_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        export.to_peft(tmp_path / "run", tmp_path / "out")
