"""A text cut to what a model reads of it, at token boundaries of the model's own tokenizer.

Held-out loss scores a whole document in one pass, so a document longer than the base's context
is cut to fit (the leaderboard's text suites, best-single's validation texts), and a query-level
router reads only a document's opening. Both count tokens as ``tokenizer(text,
add_special_tokens=False)`` does, which is how the engines tokenize a score request's
continuation (``ScoreRequest``).
"""

from __future__ import annotations

from collections.abc import Sequence


def fitting_prefix(tokenizer, text: str, max_tokens: int | None) -> str:
    """The longest prefix of ``text``, cut at a token boundary, that is at most ``max_tokens``
    tokens (``text`` itself when it fits, or when ``max_tokens`` is None)."""
    if max_tokens is None:
        return text
    if max_tokens <= 0:
        return ""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    # the prefix is tokenized again by whoever scores it, and may come out longer (a character
    # split over byte-level tokens, a merge across the cut): cut earlier until it fits
    keep = max_tokens
    cut = offsets[keep - 1][1]
    while keep > 1 and len(tokenizer(text[:cut], add_special_tokens=False)["input_ids"]) > max_tokens:
        keep -= 1
        cut = offsets[keep - 1][1]
    return text[:cut]


def fit_document(tokenizer, segments: Sequence[tuple[str, str]], max_tokens: int | None) -> list[tuple[str, str]]:
    """Labelled ``segments`` cut like their joined text (``fitting_prefix``): a model's context,
    less the BOS it conditions on. Segments past the cut are dropped."""
    text = "".join(t for _, t in segments)
    cut = len(fitting_prefix(tokenizer, text, max_tokens))
    if cut == len(text):
        return list(segments)
    out: list[tuple[str, str]] = []
    pos = 0
    for label, part in segments:
        if pos >= cut:
            break
        out.append((label, part[: cut - pos]))
        pos += len(part)
    return out


def opening(tokenizer, text: str, n_tokens: int) -> str:
    """The first ``n_tokens`` tokens of ``text``, as text: what a query-level router reads of a
    document."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= n_tokens else text[: offsets[n_tokens - 1][1]]
