"""The no-Java fallback tokenizer against the Stanford PTB jar (pycocoevalcap's wrapper, the official tool)."""
from bigadapt.metrics.coco import ptb_tokenize
from bigadapt.metrics.tokenize import coco_tokenize

from .conftest import needs_java


def test_coco_punctuation_removal_keeps_brackets():
    # quotes, clause/sentence marks, dashes and dot runs go; bracket tokens stay, because the official
    # script's list has them in upper case ("-LRB-") and PTB -lowerCase emits "-lrb-".
    # PTB printed: ` well ' -- -lrb- yes -rrb- ; no : ok ? ... fine !
    assert coco_tokenize("`Well' -- (yes); no: ok? ... fine!") == ["well", "-lrb-", "yes", "-rrb-", "no", "ok", "fine"]


# Expected outputs are what PTBTokenizer -preserveLines -lowerCase (CoreNLP 3.4.1) printed, minus
# pycocoevalcap's PUNCTUATIONS tokens.
PTB_CASES = {
        "Alimentum is located in the city centre. It is not family-friendly.":
            "alimentum is located in the city centre it is not family-friendly",
        "aren 't allowed . it 's fine . rating .. ok": "aren t allowed it 's fine rating ok",
        "He said \"hello\" (twice) [maybe]": "he said hello -lrb- twice -rrb- -lsb- maybe -rsb-",
        "It costs £20-25, or $30.": "it costs # 20-25 or $ 30",
        "The U.S. team won't go; they're at St. John's": "the u.s. team wo n't go they 're at st. john 's",
        "low- -priced 'The Eagle' rock 'n' roll": "low priced the eagle rock 'n' roll",
        # abbreviations from our own list and dotted letters keep their "."; a plain word ("sat") does not
        "Dr. Smith got a Ph.D. in Jan. 2003 and the cat sat.": "dr. smith got a ph.d. in jan. 2003 and the cat sat",
        "She met Gen. Lee at 5 Main St. in Calif. at noon , etc. and so on .":
            "she met gen. lee at 5 main st. in calif. at noon etc. and so on",
}


def test_coco_tokenize_matches_stanford_ptb():
    for text, expected in PTB_CASES.items():
        assert coco_tokenize(text) == expected.split(), text


@needs_java
def test_the_jar_prints_what_the_fallback_was_written_to():
    cases = PTB_CASES
    texts = list(cases) + ["", "   "]  # blank texts come back blank (the jar never sees them)
    assert ptb_tokenize(texts) == list(cases.values()) + ["", ""]
