"""Statistics of any corpus of texts: what `fasttune data inspect`, the evaluation and the judge report.

`normalize_text` is the key for "same text" (exact duplicates, memorisation); `distinct_n` the share of
distinct n-grams; `repeat_rate` the share of texts that repeat an earlier one; `family_balance` the shares
of a metadata key (the built-in corpus's template families).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class _DropPunctuation(dict):
    """str.translate table that deletes Unicode punctuation (categories P*), filled in as characters
    are met: building it for all 1.1M code points up front would cost more than most corpora."""

    def __missing__(self, codepoint: int) -> int | None:
        value = None if unicodedata.category(chr(codepoint)).startswith("P") else codepoint
        self[codepoint] = value
        return value


_DROP_PUNCTUATION = _DropPunctuation()


def normalize_text(text: str) -> str:
    """Casefolded, punctuation (Unicode P*) dropped, whitespace collapsed: the key for "same text"."""
    return " ".join(text.casefold().translate(_DROP_PUNCTUATION).split())


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams, n-grams taken within each normalised text; 0.0 if none."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = normalize_text(text).split()
        grams = list(zip(*(words[i:] for i in range(n)), strict=False))
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def repeat_rate(texts: Sequence[str]) -> float:
    """Share of texts that repeat an earlier one after `normalize_text`; 0.0 for no texts."""
    if not texts:
        return 0.0
    return (len(texts) - len({normalize_text(t) for t in texts})) / len(texts)


def family_balance(records: Iterable[Mapping[str, Any]], key: str = "meta_template") -> dict[str, float]:
    """Share of records per value of `key`, sorted by value."""
    counts = Counter(record[key] for record in records)
    total = sum(counts.values())
    return {value: counts[value] / total for value in sorted(counts)}
