"""Robust extraction of a multiple-choice letter from a chat model's free-form answer.

Order matters: explicit statements ("the answer is (C)") beat formatting cues ("**C**", "(C)"),
which beat matching the option text; a bare leading "A " is never read as a letter because
"A" is also an English article.
"""

from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _letters_class(n: int) -> str:
    return f"[{LETTERS[:n]}]"


def extract_letter(
    response: str, choices: list[str] | None = None, n_options: int | None = None
) -> str | None:
    """Return the chosen letter (upper case) or None when the answer cannot be read."""
    if not response:
        return None
    n = n_options or (len(choices) if choices else 4)
    L = _letters_class(n)
    text = response.strip()
    patterns = (
        rf"answer\s*(?:is|would be|:)?\s*:?\s*(?:option|choice)?\s*[\(\[\*\s]*({L})(?![A-Za-z])",
        rf"^[\(\[\*\s]*({L})[\*\s]*$",  # just the letter, maybe decorated
        rf"^[\(\[\*]*({L})[\)\]\.:\*]",  # "C) ...", "C. ...", "(C) ..."
        rf"\*\*\(?({L})\)?\*\*",  # "**C**"
        rf"\(({L})\)",  # "(C)" anywhere
        rf"(?:option|choice)\s*[\(\[\*]*({L})(?![A-Za-z])",  # "option C"
    )
    for pattern in patterns:
        found = [m for m in re.findall(pattern, text, flags=re.IGNORECASE | re.MULTILINE) if m.isupper()]
        if found:
            return found[-1]  # models restate their final choice last
    return _match_choice_text(text, choices or [])


def _match_choice_text(text: str, choices: list[str]) -> str | None:
    """Fall back to the option whose text the response states; ambiguous -> None."""
    resp = _norm(text)
    normed = [_norm(c) for c in choices]
    exact = [i for i, c in enumerate(normed) if c and c == resp]
    if exact:
        return LETTERS[exact[0]]
    hits = [i for i, c in enumerate(normed) if c and re.search(rf"\b{re.escape(c)}\b", resp)]
    # drop options that only match because they are contained in a longer matching option
    hits = [i for i in hits if not any(j != i and normed[i] in normed[j] for j in hits)]
    return LETTERS[hits[0]] if len(hits) == 1 else None
