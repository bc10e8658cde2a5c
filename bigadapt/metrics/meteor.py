"""METEOR_exact_stem: our approximation of METEOR 1.5 (exact and stem modules only), used only without Java.

With Java the E2E/WebNLG/DART METEOR is the official meteor-1.5 jar (`coco.meteor`). This module is the fallback,
and its number is reported as `METEOR_exact_stem`, never as "METEOR": on the 547 E2E valid MRs with 2+ references
(first reference as the system) the full jar gives 0.4497 and this 0.4435; the gap depends on the text (it lacks
the synonym and paraphrase modules, below) and was 0.437 vs 0.398 on one 60-sentence E2E-style corpus.

What is the same as `java -jar meteor-1.5.jar - - -stdio -l en -norm` (the call the MS-COCO/E2E code
makes): the "rank" task parameters for English (alpha 0.85, beta 0.20, gamma 0.60, delta 0.75),
the module weights (exact 1.0, stem 0.6), delta weighting of function words, the Snowball English
stemmer (snowballstemmer 2.x, which matches the stemmer bundled in the jar), the beam-search
aligner (beam 40; more exact matches, then fewer chunks, then a smaller distance win), the
best-scoring reference per segment, and corpus aggregation of the sufficient statistics (chunks
of perfectly matched segments are left out, as MeteorStats does).

What differs:
* The function-word list is our own (`FUNCTION_WORDS`: English closed-class words grouped by word
  class), not the jar's, so words the two lists class differently get a different delta weight
  and segment scores can differ slightly. Against the jar run as `-m "exact stem" -w "1.0 0.6"`
  on the same PTB tokens we measured, for E2E "systems" made of each MR's first reference scored
  against its other references: the first 100 valid MRs 0.448990 vs 0.448557 (+0.00043),
  all 547 valid MRs with 2+ references -0.00084, all 616 such test MRs -0.00246; per segment
  the absolute difference averages 0.003-0.004 and reaches at most 0.0495 (test). On the
  e2e-metrics example inputs: -0.00157.
* `-norm` (the jar's English normalizer, punctuation kept, then lowercased) is our own
  implementation of its documented behaviour (`normalize`, a character scanner; no regexes or
  letter classes taken from Meteor), and the non-breaking prefixes (words whose final "." is kept,
  e.g. "Dr.", "No. 5") are our own list (`_NONBREAKING`), not the jar's. Compared word for word
  with the jar's normalizer: identical on all 51,426 E2E references (train/valid/test raw text:
  42,061 + 4,672 + 4,693), on the PTB tokens of the 9,365 valid/test references that METEOR is
  actually fed, and on the PTB/`coco_tokenize` tokens of MRPC dev (816). On raw MRPC news text
  41 of 11,602 sentences differ (52 of the jar's 256,914 words, 2.0e-4; all from the prefix list,
  mostly "Corp." before a capital, which the jar keeps whole and we split), and on
  `coco_tokenize`d MRPC train 1 of 7,336 ("p. 5"). Known divergences outside those data: a
  comma chain without spaces ("a,b,c": the jar leaves "b,c" whole, we split it) and letters
  outside the Latin and Cyrillic ranges the jar knows (Latin Extended-B such as "ș", which the
  jar isolates as a symbol). Effect on METEOR, against the same code with the jar's
  normalization: E2E scores above unchanged to the last digit; MRPC pairs (#1 scored against #2,
  dev/test/train) at most 1.1e-4 on raw text and at most 6e-6 on PTB tokens.
  (On that raw news text, punctuation tokens included, the function-word gap of the first point
  is larger than on E2E: ours - jar = +0.0077 to +0.0080; on PTB tokens +6e-5 to +1.2e-3.)
* The synonym (WordNet) and paraphrase modules (paraphrase-en.gz, 60 MB) are missing. Words the
  official jar would align through them stay unmatched here, so scores run lower than the full
  jar's (on E2E-like text by about 0.005, i.e. 0.5 of the paper's x100 METEOR).
"""
from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from ._common import check_aligned, nlg
from .tokenize import coco_tokenize

ALPHA, BETA, GAMMA, DELTA = 0.85, 0.20, 0.60, 0.75
EXACT, STEM = 0, 1
MODULE_WEIGHTS = (1.0, 0.6)
# The aligner ranks partial alignments with weights exact 1.0 / stem 0.5 added to an int field,
# so a stem match counts 0 there (Java's `int += double` truncates).
_ALIGN_WEIGHTS = (1, 0)
BEAM_SIZE = 40

# Function words for the delta weighting: our own list of English closed-class words, grouped by
# word class below (written for this project, not taken from Meteor's resource files). Entries
# are lowercased tokens as they look after `normalize`, so the clitics PTB and -norm split off
# ("'s", "n't", and the "wo"/"ca" of "wo n't"/"ca n't") are listed too.
_ARTICLES_AND_DETERMINERS = """
    a an the this that these those each every either neither some any no all both half several
    few fewer many much more most less least enough such another other others what which whose
    whatever whichever
"""
_PRONOUNS = """
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
    it its itself we us our ours ourselves they them their theirs themselves one ones oneself
    who whom whoever someone somebody something anyone anybody anything everyone everybody
    everything nobody nothing none
"""
_PREPOSITIONS = """
    about above across after against along alongside amid amidst among amongst around as at
    before behind below beneath beside besides between beyond by despite down during except for
    from in inside into like near of off on onto opposite out outside over past per since than
    through throughout till to toward towards under underneath unlike until up upon via with
    within without
"""
_CONJUNCTIONS = """
    and but or nor so yet although though because if unless whereas while whilst whether once
    when whenever where wherever how why
"""
_AUXILIARIES_AND_MODALS = """
    be am is are was were been being have has had having do does did doing will would shall
    should can could may might must ought 's 're 've 'll 'd 'm wo ca
"""
_PARTICLES_AND_GRAMMATICAL_ADVERBS = """
    not n't there here then now also too very just only even still already again ever never yes
    else quite rather
"""
FUNCTION_WORDS = frozenset(" ".join((
    _ARTICLES_AND_DETERMINERS, _PRONOUNS, _PREPOSITIONS, _CONJUNCTIONS, _AUXILIARIES_AND_MODALS,
    _PARTICLES_AND_GRAMMATICAL_ADVERBS)).split())



@lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    return _stemmer().stemWord(word)


@lru_cache(maxsize=1)
def _stemmer():
    return nlg("snowballstemmer").stemmer("english")  # pure-Python Snowball is the slow part of METEOR: cache it


def meteor_exact_stem(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
           tokenize: Callable[[str], list[str]] = coco_tokenize) -> float:
    """Corpus METEOR_exact_stem in [0, 1]; `references[i]` holds all references of `hypotheses[i]`."""
    check_aligned(hypotheses, references)
    total = MeteorStats()
    for hypothesis, refs in zip(hypotheses, references):
        total.add(segment_stats(_words(hypothesis, tokenize), [_words(r, tokenize) for r in refs]))
    return total.score()


def _words(text: str, tokenize: Callable[[str], list[str]]) -> list[str]:
    return normalize(" ".join(tokenize(text))).split()


@dataclass
class MeteorStats:
    """Meteor's sufficient statistics for one segment or, summed, for a corpus."""

    test_length: int = 0
    ref_length: int = 0
    test_function_words: int = 0
    ref_function_words: int = 0
    # [module][0 = content, 1 = function] matched words, on each side
    test_matches: list[list[int]] = field(default_factory=lambda: [[0, 0], [0, 0]])
    ref_matches: list[list[int]] = field(default_factory=lambda: [[0, 0], [0, 0]])
    chunks: int = 0

    def perfect(self) -> bool:
        return (sum(map(sum, self.test_matches)) == self.test_length
                and sum(map(sum, self.ref_matches)) == self.ref_length and self.chunks == 1)

    def add(self, other: MeteorStats) -> None:
        self.test_length += other.test_length
        self.ref_length += other.ref_length
        self.test_function_words += other.test_function_words
        self.ref_function_words += other.ref_function_words
        for mine, theirs in ((self.test_matches, other.test_matches), (self.ref_matches, other.ref_matches)):
            for module in (EXACT, STEM):
                mine[module][0] += theirs[module][0]
                mine[module][1] += theirs[module][1]
        if not other.perfect():
            self.chunks += other.chunks

    def score(self) -> float:
        precision = _weighted(self.test_matches) / _weighted_length(self.test_length, self.test_function_words)
        recall = _weighted(self.ref_matches) / _weighted_length(self.ref_length, self.ref_function_words)
        if precision == 0 or recall == 0:
            return 0.0
        f_mean = 1.0 / ((1.0 - ALPHA) / precision + ALPHA / recall)
        matched = (sum(map(sum, self.test_matches)) + sum(map(sum, self.ref_matches))) / 2
        fragmentation = 0.0 if self.perfect() else self.chunks / matched
        return max(f_mean * (1.0 - GAMMA * fragmentation ** BETA), 0.0)


def _weighted(matches: list[list[int]]) -> float:
    return sum(w * (DELTA * content + (1 - DELTA) * function)
               for w, (content, function) in zip(MODULE_WEIGHTS, matches))


def _weighted_length(length: int, function_words: int) -> float:
    # An empty side gives NaN in Java, which Meteor turns into a score of 0.
    return DELTA * (length - function_words) + (1 - DELTA) * function_words or float("inf")


def segment_stats(test: list[str], references: list[list[str]]) -> MeteorStats:
    """Statistics against the reference that scores best (the first one on a tie)."""
    best, best_score = MeteorStats(), -1.0
    for ref in references:
        stats = alignment_stats(test, ref)
        if stats.score() > best_score:
            best, best_score = stats, stats.score()
    return best


def alignment_stats(test: list[str], ref: list[str]) -> MeteorStats:
    """Align test to ref (words already normalized and lowercased) and count what Meteor counts."""
    alignment = _align(test, ref)
    stats = MeteorStats(len(test), len(ref), sum(w in FUNCTION_WORDS for w in test),
                        sum(w in FUNCTION_WORDS for w in ref))
    for j, match in enumerate(alignment):
        if match is not None:
            i, module = match
            stats.test_matches[module][test[i] in FUNCTION_WORDS] += 1
            stats.ref_matches[module][ref[j] in FUNCTION_WORDS] += 1
    stats.chunks = _count_chunks(alignment)
    return stats


def _count_chunks(alignment: list[tuple[int, int] | None]) -> int:
    """Runs of consecutive reference words aligned to consecutive test words."""
    chunks, last_end = 0, -1
    for match in alignment:
        if match is None:
            chunks += last_end != -1
            last_end = -1
        else:
            chunks += last_end not in (-1, match[0])
            last_end = match[0] + 1
    return chunks + (last_end != -1)


# -- aligner ------------------------------------------------------------------------------------

@dataclass
class _Path:
    """A partial alignment: for each reference position, (test position, module) or None."""

    matches: list
    test_used: list[bool]
    ref_used: list[bool]
    score: int = 0  # aligner-weighted matched words, counted on both sides
    chunks: int = 0
    last_end: int = -1  # test position after the last match, -1 when no chunk is open
    distance: int = 0

    def copy(self) -> _Path:
        return _Path(list(self.matches), list(self.test_used), list(self.ref_used), self.score,
                     self.chunks, self.last_end, self.distance)

    def key(self) -> tuple[int, int, int]:
        return -self.score, self.chunks, self.distance

    def take(self, i: int, module: int) -> None:
        self.score += 2 * _ALIGN_WEIGHTS[module]
        if self.last_end != -1 and i != self.last_end:
            self.chunks += 1
        self.last_end = i + 1


def _candidates(test: list[str], ref: list[str]) -> list[list[tuple[int, int]]]:
    """For each reference position, the (test position, module) pairs that match it, exact first."""
    candidates: list[list[tuple[int, int]]] = [[] for _ in ref]
    for j, word in enumerate(ref):
        candidates[j] += [(i, EXACT) for i, t in enumerate(test) if t == word]
    if test != ref:  # identical sentences use the exact module only, to avoid beam-search errors
        test_stems, ref_stems = [_stem(w) for w in test], [_stem(w) for w in ref]
        for j, stem in enumerate(ref_stems):
            candidates[j] += [(i, STEM) for i, t in enumerate(test_stems) if t == stem and test[i] != ref[j]]
    return candidates


def _align(test: list[str], ref: list[str]) -> list[tuple[int, int] | None]:
    candidates = _candidates(test, ref)
    test_coverage = [0] * len(test)
    for options in candidates:
        for i, _ in options:
            test_coverage[i] += 1
    start = _Path([None] * len(ref), [False] * len(test), [False] * len(ref))
    for j, options in enumerate(candidates):  # a match with no competitor on either side is definite
        if len(options) == 1 and test_coverage[options[0][0]] == 1:
            start.matches[j] = options[0]
            start.test_used[options[0][0]] = start.ref_used[j] = True
    return _resolve(candidates, start).matches


def _resolve(candidates: list[list[tuple[int, int]]], start: _Path) -> _Path:
    """Meteor's left-to-right beam search over reference positions, quirks included."""
    paths = [start]
    for current in range(len(candidates) + 1):
        paths.sort(key=_Path.key)
        extended = []
        for path in paths[:BEAM_SIZE]:
            if current == len(candidates):
                path.chunks += path.last_end != -1
                extended.append(path)
            elif path.ref_used[current]:
                i, module = path.matches[current]
                path.take(i, module)
                path.distance += abs(current - i)
                extended.append(path)
            else:
                extended += _branch(path, current, candidates[current])
        paths = extended or paths[:1]
    return min(paths, key=_Path.key)


def _branch(path: _Path, j: int, options: list[tuple[int, int]]) -> list[_Path]:
    branches = []
    for i, module in options:
        if path.test_used[i]:
            continue
        new = path.copy()
        new.matches[j] = (i, module)
        new.test_used[i] = new.ref_used[j] = True
        new.take(i, module)
        path.distance += abs(j - i)  # Meteor adds the distance to the unextended path
        branches.append(new)
    if path.last_end != -1:  # skipping j closes the open chunk
        path.chunks += 1
        path.last_end = -1
    return [*branches, path]


# -- Meteor's -norm text normalization (English, punctuation kept) ---------------------------------
# Written from the normalizer's documented behaviour, as a character scanner of our own (see
# `normalize`). Letters are Latin and Cyrillic letters (`_is_letter`), digits are ASCII 0-9.
_DIGITS = frozenset("0123456789")
# Typographic quotes and dashes become their ASCII forms before anything else.
_ASCII_FORMS = str.maketrans({"`": "'", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-"})


# Non-breaking prefixes: words after which a final "." is part of the word, not a full stop.
# Our own list, written for this project from general knowledge of English abbreviations and
# grouped by kind below (not taken from Meteor's resource files). Lookups are case-sensitive and
# see the word before lowercasing. Words with an inner "." ("e.g.", "i.e.", "U.S.") never get
# here: the dotted-word rule in `_split_final_dot` joins them first ("eg", "ie", "us").
# Abbreviations that usually close a sentence or a name ("etc.", "Inc.", "Ltd.", "Co.", "Jr.",
# "Ave.") are left out on purpose, so a full stop after them is still split off.
_NONBREAKING_ALWAYS = {
    "initials": " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "titles and honorifics": "Mr Mrs Ms Messrs Mme Mlle Dr Drs Prof Profs Rev Revd Hon Fr Sr St Sts",
    "military and civil ranks": "Gen Lt Lieut Col Maj Capt Cmdr Cdr Adm Brig Sgt Cpl Pvt Gov Sen Rep Pres Supt Insp",
    "names of places and bodies": "Mt Ft Dept Univ Assn Inst",
    "latin and legal (lowercase)": "cf viz vs v al",
}
# Only before a number ("No. 5", "Art. 12", "pp. 3-9"); elsewhere "No." is the word "no" ending a sentence.
_NONBREAKING_BEFORE_NUMBER = {
    "numbering": "No Nos Nr Art Arts Sec Ch Vol Vols Fig Figs Eq",
    "pages": "p pp",
}
_NONBREAKING = {
    **{word: "numeric" for words in _NONBREAKING_BEFORE_NUMBER.values() for word in words.split()},
    **{word: "any" for words in _NONBREAKING_ALWAYS.values() for word in words.split()},
}


def normalize(line: str) -> str:
    """Meteor 1.5's `-norm` for English (punctuation kept), then lowercased; our own implementation.

    Behaviour: typographic quotes and dashes become ASCII ("''" a double quote, each pair of hyphens
    one hyphen); every character that is not a letter, digit, space or one of . , ' - is a token of its
    own; a run of two or more dots is a token; a comma stays only between two digits ("1,000");
    a hyphen joining two words ("family-friendly") becomes a space; an apostrophe goes with the
    letters after it when it splits a word ("won't" -> "won 't", "1990's" -> "1990 's") and
    otherwise stands alone; a word-final "." is split off unless the word is an abbreviation
    (`_split_final_dot`).
    """
    text = line.translate(_ASCII_FORMS).replace("''", '"').replace("--", "-")
    pieces: list[str] = []
    last_join = {"-": -2, "'": -2}  # position of the last hyphen / apostrophe that joined two words
    for k, char in enumerate(text):
        before = text[k - 1] if k else " "
        after = text[k + 1] if k + 1 < len(text) else " "
        # In a chain of one-character parts ("x-a-share", "'n'b") the jar acts on every other mark
        # only: a mark whose left neighbour was the right side of the previous such mark is left alone.
        chained = last_join.get(char) == k - 2
        if char.isspace() or _is_letter(char) or char in _DIGITS:
            pieces.append(char)
        elif char == ".":
            in_run = before == "." or after == "."
            opens, closes = in_run and before != ".", in_run and after != "."
            pieces.append(f"{' ' if opens else ''}.{' ' if closes else ''}")
        elif char == ",":
            pieces.append("," if before in _DIGITS and after in _DIGITS else " , ")
        elif char == "-":
            after_word = _is_word_char(before) or (before == "." and text[k - 2:k - 1] != ".")
            joins_words = after_word and _is_word_char(after) and not chained
            last_join["-"] = k if joins_words else last_join["-"]
            pieces.append(" " if joins_words else "-")
        elif char == "'":
            inside_word = _is_letter(before) and _is_letter(after)
            last_join["'"] = k if inside_word and not chained else last_join["'"]
            pieces.append("'" if inside_word and chained else _apostrophe(before, after))
        else:
            pieces.append(f" {char} ")
    words = "".join(pieces).split()
    return " ".join(_split_final_dot(w, words[k + 1] if k + 1 < len(words) else None)
                    for k, w in enumerate(words)).lower()


@lru_cache(maxsize=4096)
def _is_letter(char: str) -> bool:
    """Latin and Cyrillic letters; other scripts (Greek, CJK) and signs such as "µ" count as symbols."""
    if char.isascii():
        return char.isalpha()
    return char.isalpha() and unicodedata.name(char, "").startswith(("LATIN", "CYRILLIC"))


def _is_word_char(char: str) -> bool:
    return _is_letter(char) or char in _DIGITS


def _apostrophe(before: str, after: str) -> str:
    """English clitics: a quote inside a word starts the next token; elsewhere it is a token itself."""
    if _is_letter(before):
        return " '" if _is_letter(after) else " ' "
    if before in _DIGITS and _is_letter(after):
        return " '" if after == "s" else "'"  # "1990's" splits, other digit-letter pairs stay joined
    return " ' "


def _split_final_dot(word: str, following: str | None) -> str:
    """Split a word-final "." unless the word is a known abbreviation (our `_NONBREAKING` list)."""
    if len(word) < 2 or not word.endswith(".") or set(word) == {"."}:
        return word
    prefix = word[:-1]
    if "." in prefix and any(_is_letter(c) for c in prefix):
        return word.replace(".", "")  # U.S. -> US
    kind = _NONBREAKING.get(prefix)
    if kind == "any" or (following and following[0].islower() and following[0].isascii()):
        return word
    if kind == "numeric" and following and following[0].isdigit():
        return word
    return f"{prefix} ."
