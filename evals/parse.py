"""The POPE answer parser.

`parse_pope(answer)` follows POPE's own `evaluate.py` (RUCAIBox/POPE): keep the first sentence, and
the answer is "no" if one of its words is a negation, "yes" otherwise (an answer that says neither
counts as "yes", as in POPE, so the yes-ratio stays comparable with published numbers). Two documented
extensions, both only ever turning a "yes" into a "no":

* case-insensitive words with punctuation stripped ("NO", "No.", "no," are "no"; POPE matches only
  the exact tokens `No`, `no`, `not`);
* a word ending in "n't" is a negation ("There isn't a dog." is "no"), as OPERA's POPE scorer does,
  and so are "none" and "nope".

The first sentence ends at the first ".", "!" or "?" (POPE splits on "." only), so "No! There is a
cat." is "no" and "Yes, there is a dog. It is not a cat." is "yes".
"""

from __future__ import annotations

import re

NEGATIONS = frozenset({"no", "not", "none", "nope"})
_SENTENCE_END = re.compile(r"[.!?]")
_WORD = re.compile(r"[a-z']+")


def first_sentence(text: str) -> str:
    text = text.strip()
    m = _SENTENCE_END.search(text)
    return text[: m.start()] if m else text


def parse_pope(answer: str) -> str:
    """'yes' or 'no' (see the module docstring for the exact rule)."""
    words = _WORD.findall(first_sentence(answer).lower().replace("\u2019", "'"))
    if any(w in NEGATIONS or w.endswith("n't") for w in words):
        return "no"
    return "yes"
