"""The built-in default dataset: a deterministic synthetic corpus of folk proverbs ("sayings").

It imitates the shape of a reference fine-tuning set of 36,079 prompt/answer pairs built from 9,025
unique sayings. Every saying is composed from the word lists below in one of seven grammatical shapes
(`TEMPLATE_FAMILIES`), and is then asked for by four different prompts, so the corpus is

- ceil(n / 4) sayings, each answered by four consecutive records (the last saying may get fewer, so
  that there are exactly n records); records stay grouped by saying, so a split at a multiple of four
  never puts the same saying on both sides;
- the seven families in equal shares (about 14.3% each, dealt in shuffled rounds of seven);
- the five input types (`INPUT_TYPES`) in equal shares (20% each): each saying leaves out one of the
  five, dealt in shuffled rounds of five, and takes the other four in random order;
- answers of one sentence, 8 to 16 words (about 12 on average), capitalised and ending with a period.

Word, persona and template prompts name a noun that the saying contains, and category prompts the
theme its moral was written for, so prompt and answer agree. Sayings are never retried or deduplicated:
the slot lists are large enough that fewer than 1% of the sayings repeat another one at the reference
size (birthday collisions in the combinatorial space: 0.1-0.2% of sayings at n = 36,079).

The word lists and prompts are in data/synth_words.py; the corpus statistics that `fasttune data inspect`
reports for any corpus are in data/text_stats.py.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from fasttune.data.synth_words import (
    _ADJ_BAD,
    _ADJ_GOOD,
    _AGENTS,
    _ALL_NOUNS,
    _BETTER_BAD,
    _BETTER_GOOD,
    _CATEGORY_PROMPTS,
    _CREATURES_AND_THINGS,
    _FRESH,
    _GRAND,
    _HE_WHO_RESULTS,
    _HE_WHO_SUBJECTS,
    _HELD,
    _HUMBLE,
    _JUDGE_VERBS,
    _KIND,
    _MANNER,
    _NEGLECT,
    _NEVER_UNTIL,
    _NOUN_CLASS,
    _OPEN_PROMPTS,
    _PERSONA_PROMPTS,
    _PERSONAS,
    _PERSONS,
    _PLAIN,
    _RIVALS,
    _SMALL,
    _STATE_THINGS,
    _TAILS,
    _TEMPLATE_PROMPTS,
    _THAT_BAD,
    _THAT_BAD_ENDS,
    _THAT_GOOD,
    _THAT_GOOD_ENDS,
    _TOMORROW_AND,
    _TOMORROW_BAD,
    _TOMORROW_GOOD,
    _TRAITS,
    _VERB_OBJECTS,
    _VP_BAD,
    _VP_GOOD,
    _WHEN,
    _WHERE_RESULTS,
    _WORD_PROMPTS,
)

TEMPLATE_FAMILIES: tuple[str, ...] = (
    "better_than", "he_who", "never_before", "where_there_is", "the_x_that", "a_adj_noun", "today_tomorrow",
)  # fmt: skip
INPUT_TYPES: tuple[str, ...] = ("word", "category", "persona", "template", "open")
PROMPTS_PER_SAYING = 4


# --- grammar ------------------------------------------------------------------------------------------
_AN_BEFORE = ("honest", "hour", "heir", "honor")  # silent h
_A_BEFORE = ("one", "once", "use", "usu", "uni", "eu", "ewe")  # vowel letter, consonant sound


def _article(word: str) -> str:
    w = word.lower()
    if w.startswith(_AN_BEFORE):
        return "an"
    if w.startswith(_A_BEFORE):
        return "a"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


def _an(phrase: str) -> str:
    """The phrase with its indefinite article: "an old goat", "a humble axe"."""
    return f"{_article(phrase)} {phrase}"


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


def _third(verb: str) -> str:
    """Third person singular of a (possibly phrasal) verb, spelt like a plural: "boast of" -> "boasts of"."""
    head, _, rest = verb.partition(" ")
    return f"{_plural(head)} {rest}".rstrip()


def _sentence(*parts: str) -> str:
    text = " ".join(p for p in parts if p)
    return text[0].upper() + text[1:] + "."


# --- composers ------------------------------------------------------------------------------------------
class _Saying(NamedTuple):
    text: str
    source_words: list[str]  # every slot word in order of appearance (nouns singular)
    topics: tuple[str, ...]  # the nouns among them: what topic-naming prompts may mention
    theme: str  # one of THEMES, for category prompts
    shape: str  # the family's pattern as a template prompt names it


def _object(rng: random.Random) -> tuple[str, str, str]:
    """A (verb, noun, object as written) triple, the object singular or plural as the verb allows."""
    verb, noun, number = rng.choice(_VERB_OBJECTS)
    plural = number == "pl" or (number == "any" and rng.random() < 0.5)
    return verb, noun, _plural(noun) if plural else noun


def _better_than(rng: random.Random) -> _Saying:
    noun = rng.choice(_HELD)
    kind = _KIND[noun]
    humble, grand = rng.choice(_HUMBLE[kind]), rng.choice(_GRAND[kind])
    # A quarter of the time the rival is the very same thing, and the saying says "one".
    other = noun if rng.random() < 0.25 else rng.choice(_RIVALS[noun])
    good, theme = rng.choice(_BETTER_GOOD)
    bad = rng.choice(_BETTER_BAD)
    rival = "one" if other == noun else other
    text = _sentence("Better", _an(f"{humble} {noun}"), good, "than", _an(f"{grand} {rival}"), bad)
    topics = (noun,) if other == noun else (noun, other)
    words = [humble, noun, grand] + ([] if other == noun else [other])
    return _Saying(text, words, topics, theme, "Better a ... than a ...")


def _he_who(rng: random.Random) -> _Saying:
    subject, possessive = rng.choice(_HE_WHO_SUBJECTS)
    verb, noun, obj = _object(rng)
    when = rng.choice(_WHEN) if rng.random() < 0.75 else ""
    result, theme = rng.choice(_HE_WHO_RESULTS)
    text = _sentence(subject, _third(verb), possessive, obj, when, result)
    return _Saying(text, [noun], (noun,), theme, f"{subject} ...")


def _never_before(rng: random.Random) -> _Saying:
    verb, number = rng.choice(_JUDGE_VERBS)
    noun = rng.choice(_ALL_NOUNS)
    adjective = rng.choice(_FRESH[_KIND[noun]])
    roll = rng.random()
    if number == "pl" or (number == "own" and roll < 0.25):
        phrase = f"your {adjective} {_plural(noun)}"
    elif number == "own" and roll < 0.55:
        phrase = f"your {adjective} {noun}"
    else:
        phrase = f"{adjective} {_plural(noun)}" if roll < 0.3 else _an(f"{adjective} {noun}")
    until, theme = rng.choice(_NEVER_UNTIL)
    text = _sentence("Never", verb, phrase, until)
    return _Saying(text, [adjective, noun], (noun,), theme, "Never ... before ...")


def _where_there_is(rng: random.Random) -> _Saying:
    trait, theme, good = rng.choice(_TRAITS)
    agent = rng.choice(_AGENTS)
    if rng.random() < 0.5:
        opening, shape = f"Where there is {_an(f'{trait} {agent}')},", "Where there is ..., ..."
    else:
        opening, shape = f"Where there are {trait} {_plural(agent)},", "Where there are ..., ..."
    pattern, same = rng.choice(_WHERE_RESULTS)
    good_state, bad_state, thing = rng.choice(_STATE_THINGS)
    state = good_state if same == good else bad_state
    result = pattern.format(np=_an(f"{state} {thing}"), thing=thing, state=state)
    text = _sentence(opening, result)
    return _Saying(text, [trait, agent, state, thing], (agent, thing), theme, shape)


def _the_x_that(rng: random.Random) -> _Saying:
    noun = rng.choice(_CREATURES_AND_THINGS)
    kind = _KIND[noun]
    adjective = rng.choice(_PLAIN[kind]) if rng.random() < 0.8 else ""
    if rng.random() < 0.5:
        (clause, theme), end = rng.choice(_THAT_GOOD[kind]), rng.choice(_THAT_GOOD_ENDS[kind])
    else:
        (clause, theme), end = rng.choice(_THAT_BAD[kind]), rng.choice(_THAT_BAD_ENDS[kind])
    text = _sentence("The", adjective, noun, "that", clause, end)
    words = [adjective, noun] if adjective else [noun]
    return _Saying(text, words, (noun,), theme, "The ... that ...")


def _a_adj_noun(rng: random.Random) -> _Saying:
    noun = rng.choice(_CREATURES_AND_THINGS)
    kind = _KIND[noun]
    if rng.random() < 0.5:
        (adjective, theme), verb_phrase = rng.choice(_ADJ_GOOD[kind]), rng.choice(_VP_GOOD[kind])
    else:
        (adjective, theme), verb_phrase = rng.choice(_ADJ_BAD[kind]), rng.choice(_VP_BAD[kind])
    text = _sentence(_an(f"{adjective} {noun}"), verb_phrase, rng.choice(_TAILS))
    shape = f"{_article(adjective).capitalize()} <adjective> <thing> ..."
    return _Saying(text, [adjective, noun], (noun,), theme, shape)


def _today_tomorrow(rng: random.Random) -> _Saying:
    manner = rng.choice(_MANNER)
    roll = rng.random()
    if roll < 0.3:  # "Mend your nets today, and tomorrow you will thank yourself."
        verb, noun, obj = _object(rng)
        clause, theme = rng.choice(_TOMORROW_AND)
        text = _sentence(verb, "your", obj, manner, "today, and tomorrow", clause)
        return _Saying(text, [noun], (noun,), theme, "... your ... today, and tomorrow ...")
    subject, pronoun, possessive = rng.choice(_PERSONS)
    if roll < 0.8:  # "The nets you mend today will feed you tomorrow."
        verb, noun, obj = _object(rng)
        result, theme = rng.choice(_TOMORROW_GOOD)
    else:  # "The debts we forget today will haunt our house tomorrow."
        verb, noun, manner = rng.choice(_NEGLECT), rng.choice(_ALL_NOUNS), ""  # not "neglect gladly"
        obj = _plural(noun) if rng.random() < 0.5 else noun
        result, theme = rng.choice(_TOMORROW_BAD)
    small = rng.choice(_SMALL)
    result = result.format(o=pronoun, p=possessive)
    text = _sentence("The", small, obj, subject, verb, manner, "today", result, "tomorrow")
    words = [small, noun] if small else [noun]
    return _Saying(text, words, (noun,), theme, f"The ... {subject} ... today ... tomorrow")


_COMPOSERS = {
    "better_than": _better_than,
    "he_who": _he_who,
    "never_before": _never_before,
    "where_there_is": _where_there_is,
    "the_x_that": _the_x_that,
    "a_adj_noun": _a_adj_noun,
    "today_tomorrow": _today_tomorrow,
}
assert tuple(_COMPOSERS) == TEMPLATE_FAMILIES


def _prompt(rng: random.Random, input_type: str, saying: _Saying) -> str:
    if input_type == "open":
        return rng.choice(_OPEN_PROMPTS)
    if input_type == "category":
        return rng.choice(_CATEGORY_PROMPTS).format(c=saying.theme)
    noun = rng.choice(saying.topics)
    forms = {"w": noun, "pl": _plural(noun), "a": _an(noun)}
    if input_type == "word":
        return rng.choice(_WORD_PROMPTS).format(**forms)
    if input_type == "persona":
        pool = _PERSONAS.get(_NOUN_CLASS.get(noun, "general"), _PERSONAS["general"])
        persona = rng.choice(pool if rng.random() < 0.5 else _PERSONAS["general"])
        topic = forms["pl"] if rng.random() < 0.7 else f"the {noun}"
        return rng.choice(_PERSONA_PROMPTS).format(p=persona, t=topic)
    return rng.choice(_TEMPLATE_PROMPTS).format(s=saying.shape, **forms)


def _dealt(rng: random.Random, values: Sequence[str], count: int) -> list[str]:
    """`count` values dealt in shuffled rounds of the whole set: shares equal to within one round."""
    out: list[str] = []
    while len(out) < count:
        round_ = list(values)
        rng.shuffle(round_)
        out.extend(round_)
    return out[:count]


def generate(n: int = 36079, seed: int = 0) -> list[dict]:
    """n prompt/answer records, four per saying, deterministic in (n, seed); see the module docstring."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(seed)
    n_sayings = -(-n // PROMPTS_PER_SAYING)
    families = _dealt(rng, TEMPLATE_FAMILIES, n_sayings)
    left_out = _dealt(rng, INPUT_TYPES, n_sayings)
    records: list[dict] = []
    for family, skipped in zip(families, left_out, strict=True):
        saying = _COMPOSERS[family](rng)
        input_types = [t for t in INPUT_TYPES if t != skipped]
        rng.shuffle(input_types)
        for input_type in input_types[: n - len(records)]:
            records.append({
                "input": _prompt(rng, input_type, saying), "output": saying.text, "meta_template": family,
                "meta_input_type": input_type, "source_words": list(saying.source_words),
            })  # fmt: skip
    return records
