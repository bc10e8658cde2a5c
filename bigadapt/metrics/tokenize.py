"""The two tokenizations the E2E NLG evaluation (tuetschek/e2e-metrics, run with `-p` by microsoft/LoRA) applies.

Both are our own code, written from the tools' documented behaviour (no regexes or lists copied).

* BLEU and NIST go through `metrics/pymteval.py`, a Python port of mteval-v13a's NormalizeText:
  SGML entities are un-escaped, punctuation is split off (but not "-" or "'", and "." / "," only
  away from digits; a "-" right after a digit is split), and n-grams are matched
  case-insensitively. `mteval_tokenize` does all of that (lowercasing up front) with a character
  scanner. Compared with pymteval's own tokenizer (lowercased): identical, token for token, on
  all E2E references (valid 4,672, test 4,693, train 42,061 sentences) and all MRPC sentences
  (dev 816, train 7,336, test 3,450). Known divergence, absent from both: doubly escaped entities
  ("&amp;lt;" becomes "&lt;" here, "<" in mteval, which un-escapes one entity after the other).
* METEOR, ROUGE-L and CIDEr go through the MS-COCO caption code: Stanford PTBTokenizer (CoreNLP
  3.4.1, Java) with `-lowerCase`, then punctuation tokens are dropped (`_coco_dropped`).
  `coco_tokenize` re-implements the parts of PTB that matter for that: splitting off edge
  punctuation (keeping abbreviations such as "u.s." and "st."), clitics ("wo n't", "it 's"),
  brackets ("-lrb-"), quotes, currency ("£" becomes "#"). The abbreviations kept whole are our own
  list of common English ones (`_ABBREVIATIONS`) plus dotted letters, not taken from PTB or
  Meteor. Compared with the jar followed by the official punctuation removal: identical on all
  9,365 E2E valid/test references (4,672 + 4,693) and on the e2e-metrics example inputs; on raw
  news text it differs in MRPC dev on 10 of 816 sentences (22 of 15,944 token positions), train
  245 of 7,336 (619 of 141,878), test 136 of 3,450 (322 of 66,242), in rarer cases PTB handles
  and we do not ("s&p", "us$", "1.76bn", "anti-", "no.", "pfc."; "cannot" is handled).
"""
from __future__ import annotations

import re
import string

# -- mteval-v13a NormalizeText, written from its documented behaviour ------------------------------
# ASCII punctuation that always becomes a token of its own: everything in string.punctuation except
# the four marks mteval treats specially ("." and "," depend on digits, "-" on a preceding digit,
# "'" is never split off).
_MTEVAL_ALWAYS_SPLIT = frozenset(string.punctuation) - frozenset(".,-'")
_ASCII_DIGITS = frozenset(string.digits)
_SGML_ENTITY = re.compile(r"&(amp|lt|gt|quot);")
_SGML_CHARS = {"amp": "&", "lt": "<", "gt": ">", "quot": '"'}

# -- MS-COCO (pycocoevalcap) punctuation removal -------------------------------------------------------
# The tokens the caption code throws away after PTB tokenization, grouped by kind (our own grouping;
# `_coco_dropped` is the test): PTB's quote tokens, clause and sentence marks, hyphens and dashes,
# and runs of dots (PTB's ellipsis). Bracket tokens are *kept*: the official script lists them in
# upper case ("-LRB-"), but compares that list with the lower-cased tokens `-lowerCase` produced
# ("-lrb-"), so they never match and survive into the scores.
_COCO_QUOTES = frozenset(["`", "``", "'", "''"])
_COCO_MARKS = frozenset(".,;:?!")
_COCO_DASHES = frozenset(["-", "--"])
# PTB escapes brackets (the escaped forms then survive the punctuation removal, see above), and
# normalizes quotes, dashes and currency signs.
_PTB_SYMBOLS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-",
                '"': "''", "“": "``", "”": "''", "–": "--", "—": "--", "£": "#", "€": "$", "¢": "cents"}
_PTB_SPLIT = re.compile(r"""([()\[\]{}"“”–—£€¢$%&+/=<>*])""")
_PTB_ESCAPED = frozenset(_PTB_SYMBOLS.values())
# A right single quote is an apostrophe for PTB only at a word edge or before a clitic (d’cunha stays).
_APOSTROPHE = re.compile(r"’(?=(?:s|re|ve|ll|d|m|t)\b)|(?<![a-z0-9])’|’(?![a-z0-9])")
_CLITIC = re.compile(r"^(.*[a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m)$")
_KEEP_QUOTED = re.compile(r"^'(s|re|ve|ll|d|m|n'|[0-9]+s)$")  # clitics and '90s keep their quote
# Words PTB keeps whole with their final "." (our own list of common English abbreviations, grouped
# below; written for this project). Ordinary words that might end a sentence ("sat", "sun", "miss",
# "ill", "no", "may") are left out on purpose.
_ABBREVIATIONS = {
    "titles": "mr mrs ms messrs mme mlle dr prof rev hon fr sr jr st",
    "ranks and offices": "gen lt lieut col maj capt cmdr adm brig sgt cpl pvt gov sen rep pres supt insp",
    "months": "jan feb mar apr jun jul aug sep sept oct nov dec",
    "weekdays": "tue tues thu thur thurs fri",
    "streets and places": "ave blvd rd ln hwy sq ct pl mt ft pt apt bldg",
    "organisations": "inc ltd co corp bros assn dept univ govt intl natl",
    "reference and latin": "etc vs cf al approx vol fig figs est",
    "us states": "ala ariz ark calif colo conn fla kan kans mich minn mont neb nev okla tenn tex wis wyo",
}
_ABBREVIATION = re.compile(
    r"^[a-z](?:\.[a-z])*\.$"  # single letters with periods: "u.s.", "e.g.", "j."
    r"|^[a-z]+(?:\.[a-z]+)+\.$"  # dotted words: "ph.d."
    rf"|^(?:{'|'.join(' '.join(_ABBREVIATIONS.values()).split())})\.$")
_EDGE = ".,;:!?'`-"


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's NormalizeText (non-international), lowercased for case-insensitive matching.

    Documented behaviour, implemented as a character scanner: drop "<skipped>" markers and join
    lines, un-escape the SGML entities &amp; &lt; &gt; &quot;, make every ASCII punctuation mark
    a separate token except "'" (never split), "-" (split only right after a digit) and "." / ","
    (kept only between two digits, as in "3.5" or "1,000"), then split on whitespace.
    """
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = _SGML_ENTITY.sub(lambda m: _SGML_CHARS[m.group(1)], text)  # one pass: "&amp;lt;" -> "&lt;"
    out = []
    for k, char in enumerate(text):
        before = text[k - 1] if k else " "
        after = text[k + 1] if k + 1 < len(text) else " "
        if char in _MTEVAL_ALWAYS_SPLIT:
            split = True
        elif char in ".,":
            split = before not in _ASCII_DIGITS or after not in _ASCII_DIGITS
        elif char == "-":
            split = before in _ASCII_DIGITS
        else:
            split = False
        out.append(f" {char} " if split else char)
    return "".join(out).lower().split()


def coco_tokenize(text: str) -> list[str]:
    """PTBTokenizer(-lowerCase) as pycocoevalcap runs it, punctuation tokens removed (see module doc)."""
    tokens = []
    for chunk in _PTB_SPLIT.sub(r" \1 ", _APOSTROPHE.sub("'", text.lower()).replace("‘", "`")).split():
        tokens += _ptb_word(_PTB_SYMBOLS.get(chunk, chunk))
    return [token for token in tokens if not _coco_dropped(token)]


def _coco_dropped(token: str) -> bool:
    """Whether pycocoevalcap removes this (lower-cased) PTB token as punctuation."""
    return (token in _COCO_QUOTES or token in _COCO_MARKS or token in _COCO_DASHES
            or (token[:1] == "." and not token.strip(".")))


def _ptb_word(word: str) -> list[str]:
    """The tokens PTB makes of one whitespace-delimited word, minus the edge punctuation (dropped anyway)."""
    if word in _PTB_ESCAPED:
        return [word]
    while (word[0] in _EDGE and any(c.isalnum() for c in word) and not _KEEP_QUOTED.match(word)
           and not (word[0] == "-" and word[1].isdigit())):  # -25 stays a number
        word = word[1:]
    while (len(word) > 1 and word[-1] in _EDGE and set(word) != {word[-1]}
           and not _ABBREVIATION.match(word) and not _KEEP_QUOTED.match(word)):
        word = word[:-1]
    if word == "cannot":
        return ["can", "not"]
    clitic = _CLITIC.match(word)
    return [clitic.group(1), clitic.group(2)] if clitic else [word]
