"""The LLM judge's prompts and the reading of its replies: the rubric and pairwise templates (the
defaults, or a file with named {placeholders}, checked before any request), and the score and verdict
parsers (eval/judge.py asks, caches and summarises)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fasttune.errors import FasttuneError

RUBRIC_FIELDS = ("instruction", "response", "reference")
RUBRIC_REQUIRED = ("instruction", "response")
PAIRWISE_FIELDS = ("instruction", "response_a", "response_b", "reference")
PAIRWISE_REQUIRED = ("instruction", "response_a", "response_b")

DEFAULT_RUBRIC = """\
You are grading a reply written by an AI assistant. Read the user's request and the reply, then rate the
reply from 1 to 5:
5: fully does what was asked; correct, fluent and natural
4: does what was asked with a small flaw
3: partly does what was asked, or has a clear flaw
2: mostly fails: off-topic, garbled, or ignores the request
1: empty, nonsense, or harmful

[Request]
{instruction}

[Reply]
{response}

Explain your grade in one or two sentences, then end with a line "Score: N" where N is 1, 2, 3, 4 or 5.
"""

DEFAULT_PAIRWISE = """\
You are comparing two replies written by AI assistants to the same user request. Decide which reply does
better what the user asked: correct, fluent, natural and on topic. Do not let the order of the replies or
their length sway you.

[Request]
{instruction}

[Reply A]
{response_a}

[Reply B]
{response_b}

Explain your choice in one or two sentences, then end with a line "Verdict: A", "Verdict: B" or
"Verdict: tie".
"""


class JudgeError(FasttuneError):
    """The judge cannot be used at all (bad URL, key or model, unreadable prompt file or cache)."""


# ----------------------------------------------------------------------------------------------------------
# Prompt templates


_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


@dataclass(frozen=True)
class PromptTemplate:
    text: str
    source: str  # the file it came from, or "built-in rubric" / "built-in pairwise prompt"
    fields: tuple[str, ...]

    def render(self, **values: str) -> str:
        # One pass: a value that contains "{response}" is not substituted again.
        return _PLACEHOLDER.sub(
            lambda m: values.get(m.group(1), "") if m.group(1) in self.fields else m[0], self.text
        )

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def parse_template(text: str, source: str, allowed: Sequence[str], required: Sequence[str]) -> PromptTemplate:
    """Check a template's placeholders; raises JudgeError naming `source` and the line at fault."""
    if not text.strip():
        raise JudgeError(f"{source}: the prompt file is empty")
    found = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        for m in _PLACEHOLDER.finditer(line):
            if m.group(1) not in allowed:
                raise JudgeError(
                    f"{source}:{lineno}: unknown placeholder {m[0]}; the placeholders are "
                    + ", ".join("{" + f + "}" for f in allowed)
                )
            found.add(m.group(1))
    missing = [f for f in required if f not in found]
    if missing:
        raise JudgeError(f"{source}: the prompt must contain " + " and ".join("{" + f + "}" for f in missing))
    return PromptTemplate(text, source, tuple(allowed))


def load_template(path: str | os.PathLike | None, kind: str = "rubric") -> PromptTemplate:
    """A rubric (kind "rubric") or pairwise (kind "pairwise") template from a file; None: the built-in."""
    allowed, required, default = (
        (RUBRIC_FIELDS, RUBRIC_REQUIRED, DEFAULT_RUBRIC)
        if kind == "rubric"
        else (PAIRWISE_FIELDS, PAIRWISE_REQUIRED, DEFAULT_PAIRWISE)
    )
    if path is None:
        return parse_template(default, f"built-in {kind} prompt", allowed, required)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JudgeError(f"{path}: {kind} prompt file not found") from None
    except UnicodeDecodeError as e:
        raise JudgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise JudgeError(f"{path}: is a folder, not a {kind} prompt file") from None
    return parse_template(text, str(path), allowed, required)


# ----------------------------------------------------------------------------------------------------------
# Parsing replies


_SCORE_WORD = re.compile(r"score[^\d\n]{0,20}?(-?\d+)", re.IGNORECASE)
_OUT_OF_5 = re.compile(r"(?<![\d.])(\d+)\s*(?:/|out of)\s*5(?!\d|\.\d)", re.IGNORECASE)
_INTEGER = re.compile(r"(?<![\d.])\d+(?!\d|\.\d)")  # not part of a longer number or a decimal
_RANGE = re.compile(
    r"(?<![\d.])[1-5]\s*(?:-|\u2013|to)\s*[1-5](?!\d|\.\d)"
)  # "(1-5)": the scale, not a score
_MARKUP = " \t\r\n*_[]().:#`\"'"
_VERDICT = re.compile(r"verdict[^A-Za-z\n]{0,20}?\b(A|B|tie)\b", re.IGNORECASE)


def _in_range(value: int) -> tuple[int | None, str]:
    return (value, "") if 1 <= value <= 5 else (None, f"score {value} is outside 1-5")


def parse_score(text: str) -> tuple[int | None, str]:
    """(score, "") or (None, why not); the rules are in the module docstring."""
    text = _RANGE.sub(" ", text)
    for pattern in (_SCORE_WORD, _OUT_OF_5):
        m = list(pattern.finditer(text))
        if m:
            return _in_range(int(m[-1].group(1)))
    bare = text.strip(_MARKUP)
    if bare.isdigit():
        return _in_range(int(bare))
    values = {int(x) for x in _INTEGER.findall(text)}
    if not values:
        return None, "no score found"
    if len(values) == 1 and 1 <= next(iter(values)) <= 5:
        return next(iter(values)), ""
    return None, f"ambiguous: integers {sorted(values)} and no 'Score: N'"


def parse_verdict(text: str) -> tuple[str | None, str]:
    """("A" | "B" | "tie", "") or (None, why not)."""
    m = list(_VERDICT.finditer(text))
    if m:
        v = m[-1].group(1)
        return ("tie" if v.lower() == "tie" else v.upper()), ""
    bare = text.strip(_MARKUP).lower()
    if bare in ("a", "b", "tie"):
        return ("tie" if bare == "tie" else bare.upper()), ""
    return None, "no verdict (A, B or tie) found"
