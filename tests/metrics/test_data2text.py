"""WebNLG/DART metrics against the tools GenerationEval runs: sacrebleu, pyter, and the meteor-1.5 jar in file mode."""
import subprocess
from pathlib import Path

import pytest

from bigadapt.metrics import data2text_metrics
from bigadapt.metrics.data2text import ter_segment_mean, word_tokenize

from .conftest import needs_java

# sacrebleu's README example: `sacrebleu` printed BLEU = 48.53 and TER = 40.00 for it.
HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [["The dog bit the man.", "The dog had bit the man."],
        ["It was not unexpected.", "No one was surprised."],
        ["The man bit him first.", "The man had bitten the dog."]]


def test_bleu_and_corpus_ter_are_sacrebleus():
    scores = data2text_metrics(HYPS, REFS, java=False)
    assert round(scores["BLEU"], 2) == 48.53
    assert scores["TER_corpus"] == pytest.approx(0.40)
    assert set(scores) == {"BLEU", "METEOR_exact_stem", "TER_segment_mean", "TER_corpus"}


def test_segment_ter_is_generationevals_definition():
    # pyter per segment, best reference, mean: 0 (exact), then by hand on NLTK tokens
    # "It was n't surprising ." vs "It was not unexpected ." -> 2 substitutions / 5; vs the other 5 words -> more
    # "The man had just bitten him ." vs "The man had bitten the dog ." -> delete "just", sub him->the, insert dog: 3/7
    hyp = [word_tokenize(h) for h in HYPS]
    ref = [[word_tokenize(r) for r in rs] for rs in REFS]
    assert hyp[1] == "It was n't surprising ."
    assert ter_segment_mean(hyp, ref) == pytest.approx((0 + 2 / 5 + 3 / 7) / 3)
    # ...which is not the corpus definition on the same text
    assert ter_segment_mean(hyp, ref) != pytest.approx(data2text_metrics(HYPS, REFS, java=False)["TER_corpus"])


@needs_java
def test_meteor_is_the_jar_as_generationeval_runs_it(tmp_path: Path):
    from bigadapt.metrics.coco import _meteor
    jar = Path(__import__("pycocoevalcap.meteor.meteor", fromlist=["x"]).__file__).parent / "meteor-1.5.jar"
    hyp = [word_tokenize(h) for h in HYPS]
    ref = [[word_tokenize(r) for r in rs] for rs in REFS]
    (tmp_path / "hyp").write_text("\n".join(hyp))
    (tmp_path / "ref").write_text("\n".join(r for rs in ref for r in rs))
    # GenerationEval: java -Xmx2G -jar meteor-1.5.jar HYP REF -l en -norm -r NUM_REFS; the last line is the score
    out = subprocess.run(["java", "-Xmx2G", "-jar", str(jar), str(tmp_path / "hyp"), str(tmp_path / "ref"),
                          "-l", "en", "-norm", "-r", "2"], capture_output=True, text=True, check=True,
                         cwd=jar.parent).stdout
    official = float(out.strip().splitlines()[-1].split()[-1])
    scores = data2text_metrics(HYPS, REFS)
    assert scores["METEOR"] == pytest.approx(official, abs=1e-12)
    assert _meteor.cache_info().currsize == 1  # one jar process per Python process
