import pytest

from bigadapt.metrics.ter import corpus_ter, translation_edit_rate


def test_edits_by_hand():
    assert translation_edit_rate("a b c".split(), "a b c d".split()) == (1, 4)  # one insertion
    assert translation_edit_rate("c a b d".split(), "a b c d".split()) == (1, 4)  # shift "c" right
    # one shift of "on the mat" instead of 6 substitutions
    assert translation_edit_rate("on the mat the cat sat".split(), "the cat sat on the mat".split()) == (1, 6)


def test_identity_is_zero():
    assert corpus_ter(["The cat sat on the mat"], [["the cat sat on the mat"]]) == 0.0


def test_multiple_references_use_min_edits_over_average_length():
    # edits min(1, 1) = 1 over the average reference length (4 + 2) / 2 = 3
    assert corpus_ter(["a b c"], [["a b c d", "a b"]]) == pytest.approx(1 / 3)


def test_sacrebleu_readme_example():
    # sacrebleu's README system and two reference streams: TER = 40.00, 6 edits over 15.0 words
    # (0 + 3 + 3 edits; average reference lengths 5.5 + 4 + 5.5).
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."],
            ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    assert corpus_ter(hyps, refs) == pytest.approx(0.40)
