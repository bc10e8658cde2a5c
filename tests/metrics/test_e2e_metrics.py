import pytest

from bigadapt.data.e2e import group_references, load_e2e
from bigadapt.extras import MissingExtraError
from bigadapt.metrics import e2e_metrics

from .conftest import needs_java

# tuetschek/e2e-metrics `measure_scores.py -p` (its CoreNLP 3.4.1 PTBTokenizer, the full meteor-1.5 jar, pymteval)
# on the system built below printed these. Ours: BLEU from sacrebleu (13a, lower-cased), NIST ours, METEOR,
# ROUGE_L, CIDEr through pycocoevalcap's wrappers and jars. Measured: BLEU 60.64333657556687 (-2.1e-14), NIST
# 7.8322838251539375 (+3.2e-14), METEOR, ROUGE_L and CIDEr equal to the last digit.
OFFICIAL = {"BLEU": 60.64333657556689, "NIST": 7.8322838251539055, "METEOR": 0.4538922284445914,
            "ROUGE_L": 0.6652323025219633, "CIDEr": 1.7424921375344598}
# Our exact+stem METEOR (no Java), pinned; the jar run with `-m "exact stem" -w "1.0 0.6"` printed 0.448557.
METEOR_EXACT_STEM_OURS = 0.44899022664215965


def _first_100_valid(shared_data):
    # A "system" from real references: for the first 100 validation MRs, the first reference is the
    # hypothesis and the others are its references.
    groups = group_references(load_e2e("valid", shared_data / "e2e"))[:100]
    return [refs[0] for _, refs in groups], [refs[1:] for _, refs in groups]


@needs_java
def test_matches_the_official_scripts(shared_data):
    scores = e2e_metrics(*_first_100_valid(shared_data))
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    for name, value in OFFICIAL.items():
        assert scores[name] == pytest.approx(value, rel=1e-12), name


# All 547 valid MRs with 2+ references, same construction, e2e-metrics `-p` at full precision.
OFFICIAL_VALID_ALL = {"BLEU": 60.61390375232494, "NIST": 8.636431982239397, "ROUGE_L": 0.6547137934159739,
                      "CIDEr": 1.8943079502742, "METEOR": 0.4497238041392664}


@needs_java
def test_matches_the_official_scripts_on_all_valid_mrs(shared_data):
    groups = [g for g in group_references(load_e2e("valid", shared_data / "e2e")) if len(g[1]) > 1]
    assert len(groups) == 547
    scores = e2e_metrics([refs[0] for _, refs in groups], [refs[1:] for _, refs in groups])
    for name, value in OFFICIAL_VALID_ALL.items():
        assert scores[name] == pytest.approx(value, rel=1e-9), name


def test_without_java_meteor_has_another_name(shared_data):
    scores = e2e_metrics(*_first_100_valid(shared_data), java=False)
    assert "METEOR" not in scores  # never the paper's name for another number
    assert scores["METEOR_exact_stem"] == pytest.approx(METEOR_EXACT_STEM_OURS, rel=1e-9)
    assert scores["METEOR_exact_stem"] < OFFICIAL["METEOR"]  # the jar's synonyms and paraphrases add matches
    # the fallback PTB tokenizer equals the jar on these references: the other four are unchanged
    for name in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):
        assert scores[name] == pytest.approx(OFFICIAL[name], rel=1e-12), name


def test_identity_and_units():
    refs = [["The Vaults is a pub near Café Adriatic ."], ["Blue Spice is a coffee shop in the city centre ."]]
    scores = e2e_metrics([r[0] for r in refs], refs, java=False)
    assert scores["BLEU"] == pytest.approx(100.0)  # printed x100, like the paper
    assert scores["METEOR_exact_stem"] == pytest.approx(1.0) and scores["ROUGE_L"] == pytest.approx(1.0)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=r"\[nlg-eval\] extra: pip install 'bigadapt\[nlg-eval\]'"):
        e2e_metrics(["a"], [["a"]], java=False)
