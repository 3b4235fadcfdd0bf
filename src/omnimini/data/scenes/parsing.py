"""Answer parsers shared by the scene scorers: option letters, short answers, number words."""

from __future__ import annotations

import json
import re
import string

LETTERS = "ABCDEFGH"
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
SYNONYMS = {"grey": "gray", "violet": "purple", "big": "large", "little": "small", "centre": "center",
            "cube": "square", "ball": "circle", "none": "0", "no": "0", "upper": "above", "lower": "below",
            "top": "above", "bottom": "below", "shut": "closed"}
_ARTICLES = {"a", "an", "the"}
_MARKUP = re.compile(r"[*_`#>]+")


def normalise(text: str) -> str:
    """Lower-case, drop markdown/punctuation/articles, map number words and synonyms to one form."""
    text = _MARKUP.sub(" ", text.lower())
    text = text.translate(str.maketrans({c: " " for c in string.punctuation}))
    words = [SYNONYMS.get(w, NUMBER_WORDS.get(w, w)) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _contains_phrase(haystack: str, phrase: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(phrase)}(?!\S)", haystack) is not None


def _answer_segment(text: str) -> str | None:
    """The part after a final 'answer is' / 'answer:' marker, where models put their verdict."""
    matches = list(re.finditer(r"answer\s*(?:is|:|=)\s*(?:is\s*)?:?", text, flags=re.I))
    return text[matches[-1].end():] if matches else None


def parse_choice(response: str, choices: list[str]) -> str | None:
    """The option letter a response picks (e.g. 'B'), or None when it cannot be told.

    Accepts "B", "B.", "(B)", "**B**", "b) red", "The answer is (B)", "Answer: B" and the text of
    an option itself ("red"). Lower-case letters count only with a bracket/dot after them, so the
    article in "a red circle" is not read as option A.
    """
    letters = LETTERS[: len(choices)]
    text = _MARKUP.sub("", response).strip()
    seg = _answer_segment(text)
    for part in ([seg] if seg is not None else []) + [text]:
        part = part.strip()
        m = re.match(rf"^[\(\[]?([{letters}])(?:[\)\]\.:,]|\s*$)", part) or re.match(
            rf"^[\(\[]?([{letters.lower()}])[\)\]\.:]", part)
        if m:
            return m.group(1).upper()
        m = re.match(rf"^[\(\[]?([{letters}])\s", part)
        if m and part is seg:
            return m.group(1)
        hit = _choice_by_text(part, choices)
        if hit:
            return hit
    # Last resort: a single distinct standalone capital letter, e.g. "I pick C because ...".
    found = set(re.findall(rf"(?<![A-Za-z])\(?([{letters}])\)?(?![A-Za-z])", text))
    if re.search(r"(?<![A-Za-z])A\s+[a-z]", text):  # the article in "A red circle ..."
        found.discard("A")
    return found.pop() if len(found) == 1 else None


def _choice_by_text(text: str, choices: list[str]) -> str | None:
    norm = normalise(text)
    normed = [normalise(c) for c in choices]
    for i, c in enumerate(normed):
        if norm == c:
            return LETTERS[i]
    hits = [i for i, c in enumerate(normed) if c and _contains_phrase(norm, c)]
    # Drop options that are only mentioned as part of a longer mentioned option ("red" in "dark red").
    hits = [i for i in hits if not any(j != i and normed[i] in normed[j] for j in hits)]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def parse_short(response: str, candidates: list[str]) -> str | None:
    """The candidate answer a free-form response gives, or None when none or several are named.

    `candidates` is the answer vocabulary of the question type (e.g. all colour names, or the
    objects in the scene); they are compared after `normalise`, so "Two." matches "2".
    """
    normed = {normalise(c): c for c in candidates}
    seg = _answer_segment(response)
    for part in ([seg] if seg is not None else []) + [response]:
        norm = normalise(part)
        if norm in normed:
            return normed[norm]
        hits = [c for c in normed if c and _contains_phrase(norm, c)]
        hits = [c for c in hits if not any(d != c and _contains_phrase(d, c) for d in hits)]
        if len(hits) == 1:
            return normed[hits[0]]
        if hits:  # several named in the answer segment: ambiguous, do not fall back to the whole text
            return None
    return None


def find_json_list(text: str) -> list | None:
    """The outermost [...] span of a response parsed as JSON, when it is a non-empty list (else None)."""
    m = re.search(r"\[.*\]", text, flags=re.S)
    if not m:
        return None
    try:
        items = json.loads(m.group(0))
    except ValueError:
        return None
    return items if isinstance(items, list) and items else None
