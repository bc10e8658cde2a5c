"""Fallback for the PTB tokenization of METEOR, ROUGE-L and CIDEr when Java is missing (`coco.java_available()`).

With Java the E2E metrics tokenize with the Stanford PTBTokenizer jar that pycocoevalcap ships (`coco.ptb_tokenize`).
Without it, `coco_tokenize` stands in: our own code, written from the tool's documented behaviour (no regexes or
lists copied), for PTBTokenizer(-lowerCase) followed by pycocoevalcap's punctuation removal. It re-implements the
parts of PTB that matter for that: splitting off edge punctuation (keeping abbreviations such as "u.s." and
"st."), clitics ("wo n't", "it 's"), brackets ("-lrb-"), quotes, currency ("£" becomes "#"). Compared with the jar
followed by the official punctuation removal: identical on all 9,365 E2E valid/test references and on the
e2e-metrics example inputs; on raw news text it differs in MRPC dev on 10 of 816 sentences (22 of 15,944 token
positions), in rarer cases PTB handles and we do not ("s&p", "us$", "1.76bn", "anti-", "no.", "pfc.").
"""
from __future__ import annotations

import re

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
