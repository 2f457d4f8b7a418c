"""The built-in proverb corpus (`fasttune.data.synth`): record shape, exact counts, balance, determinism and
variety of `generate`, prompt/answer agreement and grammar, the atomic JSONL writer, and the corpus
statistics on small hand-made inputs with known answers."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from fasttune.data import synth, synth_words
from fasttune.data.synth import INPUT_TYPES, TEMPLATE_FAMILIES, generate
from fasttune.data.text_stats import distinct_n, family_balance, normalize_text, repeat_rate

REFERENCE_N = 36079  # the size of the reference data set the corpus imitates
FIELDS = {"input", "output", "meta_template", "meta_input_type", "source_words"}
TOPIC_TYPES = ("word", "persona", "template")  # prompts that name something the saying contains


@pytest.fixture(scope="module")
def reference():
    """The default corpus (wrapped in a tuple for the fixtures built on it)."""
    return (generate(REFERENCE_N, seed=0),)


@pytest.fixture(scope="module")
def corpus(reference):
    return reference[0]


def groups(records):
    """Records split per saying: they come in runs of four consecutive records (the last may be shorter)."""
    size = synth.PROMPTS_PER_SAYING
    return [records[i : i + size] for i in range(0, len(records), size)]


def sayings(records):
    """The composed saying of each group, one per saying (collisions included)."""
    return [group[0]["output"] for group in groups(records)]


def forms(word):
    """The word and its regular plurals: a prompt about "pennies" names the source word "penny"."""
    out = {word, word + "s", word + "es"}
    if word.endswith("y"):
        out.add(word[:-1] + "ies")
    return out


def mentions(text, word):
    return not forms(word).isdisjoint(normalize_text(text).split())


# --- generate: size, shape, determinism ------------------------------------------------------------


def test_generate_is_deterministic_in_seed():
    assert generate(403, seed=7) == generate(403, seed=7)
    a, b = generate(403, seed=7), generate(403, seed=8)
    assert a != b
    # A different seed gives a different corpus, not the same one shuffled or nudged.
    assert sum(x["output"] != y["output"] for x, y in zip(a, b, strict=True)) > 0.9 * len(a)


def test_generate_does_not_depend_on_hash_seed_or_process():
    """No set or hash order leaks into the corpus: two fresh interpreters with different hash seeds
    produce exactly what this one does."""
    code = "import json; from fasttune.data.synth import generate; print(json.dumps(generate(120, 5)))"
    expected = generate(120, 5)
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(run.stdout) == expected


def test_generate_leaves_the_global_random_state_alone():
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    generate(50, seed=3)
    assert random.random() == expected


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 401])
def test_generate_makes_exactly_n_records_four_per_saying(n):
    records = generate(n, seed=1)
    assert len(records) == n
    runs = groups(records)
    assert len(runs) == math.ceil(n / 4)
    for i, run in enumerate(runs):
        assert len(run) == (4 if i < len(runs) - 1 else n - 4 * (len(runs) - 1))
        assert len({r["output"] for r in run}) == 1, "a run of records is one saying"
        assert len({r["meta_template"] for r in run}) == 1
        assert len({r["meta_input_type"] for r in run}) == len(run), "four different kinds of prompt"
        assert len({r["input"] for r in run}) == len(run)


def test_generate_rejects_a_negative_or_non_integer_size():
    for bad in (-1, 2.0, "10", True):
        with pytest.raises(ValueError):
            generate(bad)


def test_every_record_has_the_five_fields_with_the_right_types(corpus):
    for r in corpus:
        assert set(r) == FIELDS
        assert isinstance(r["input"], str) and r["input"].strip()
        assert isinstance(r["output"], str) and r["output"].strip()
        assert r["meta_template"] in TEMPLATE_FAMILIES
        assert r["meta_input_type"] in INPUT_TYPES
        assert isinstance(r["source_words"], list) and r["source_words"]
        assert all(isinstance(w, str) and w for w in r["source_words"])


def test_public_constants():
    assert len(TEMPLATE_FAMILIES) == 7 == len(set(TEMPLATE_FAMILIES))
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", f) for f in TEMPLATE_FAMILIES)
    assert INPUT_TYPES == ("word", "category", "persona", "template", "open")


# --- the reference-size corpus: variety and balance ---------------------------------------------------


def test_reference_corpus_has_few_repeated_sayings(corpus):
    composed = sayings(corpus)
    assert len(composed) == math.ceil(REFERENCE_N / 4) == 9020
    collisions = len(composed) - len(set(composed))
    # Every output is one of the sayings, so distinct outputs = sayings minus their (rare) collisions.
    assert len({r["output"] for r in corpus}) == len(composed) - collisions
    assert repeat_rate(composed) < 0.01
    assert collisions < 0.01 * len(composed)


def test_reference_corpus_balances_families_and_input_types(corpus):
    families = family_balance(corpus)
    assert set(families) == set(TEMPLATE_FAMILIES)
    assert min(families.values()) >= 0.10
    types = family_balance(corpus, key="meta_input_type")
    assert set(types) == set(INPUT_TYPES)
    assert min(types.values()) >= 0.10
    assert math.isclose(sum(families.values()), 1.0) and math.isclose(sum(types.values()), 1.0)


def test_reference_outputs_are_proverb_length(corpus):
    lengths = [len(s.split()) for s in sayings(corpus)]
    assert 8 <= sum(lengths) / len(lengths) <= 16
    assert min(lengths) >= 8 and max(lengths) <= 16  # capped slot by slot, not trimmed afterwards


def test_outputs_are_one_capitalised_sentence(corpus):
    for s in set(sayings(corpus)):
        assert s[0].isupper() and s.endswith(".") and s.count(".") == 1, s
        assert "  " not in s and " ," not in s and " ." not in s, s


# --- prompt and answer agree; grammar ----------------------------------------------------------------


def test_topic_prompts_name_a_word_of_the_saying(corpus):
    for r in corpus:
        for word in r["source_words"]:
            assert mentions(r["output"], word), (word, r["output"])
        if r["meta_input_type"] in TOPIC_TYPES:
            assert any(mentions(r["input"], w) for w in r["source_words"]), r


def test_category_prompts_name_a_theme_and_open_prompts_are_generic(corpus):
    seen = set()
    for r in corpus:
        if r["meta_input_type"] == "category":
            themes = [t for t in synth_words.THEMES if t in r["input"]]
            assert themes, r["input"]
            seen.update(themes)
    assert seen == set(synth_words.THEMES), "every theme is asked about somewhere"
    # Open prompts come from a fixed set of phrasings, whatever the saying.
    open_prompts = Counter(r["input"] for r in corpus if r["meta_input_type"] == "open")
    assert 5 <= len(open_prompts) <= 20


def test_template_prompts_quote_the_shape_of_the_saying(corpus):
    shapes = set()
    for r in corpus:
        if r["meta_input_type"] == "template":
            shape = re.search(r"'([^']+)'", r["input"]).group(1)
            shapes.add(shape)
            # "Better a ... than a ..." -> "Better a.+ than a.+"; "<adjective>" is a gap as well.
            pattern = ".+".join(re.escape(part) for part in re.split(r" ?(?:\.\.\.|<[a-z]+>) ?", shape))
            assert re.match(pattern, r["output"]), (shape, r["output"])
    assert len(shapes) >= len(TEMPLATE_FAMILIES)


def article_ok(article, word):
    word = word.lower()
    vowel_sound = word[0] in "aeiou" and not word.startswith(("one", "use", "uni", "eu"))
    vowel_sound = vowel_sound or word.startswith(("honest", "hour", "heir"))
    return article == ("an" if vowel_sound else "a")


def test_indefinite_articles_match_the_next_word(corpus):
    texts = set(sayings(corpus)) | {r["input"] for r in corpus}
    checked = 0
    for text in texts:
        for article, word in re.findall(r"\b([Aa]n?) (\w+)", text):
            assert article_ok(article.lower(), word), text
            checked += 1
    assert checked > 10_000
    assert article_ok("an", "axe") and article_ok("a", "humble") and article_ok("an", "honest")


def test_verbs_agree_with_their_subjects(corpus):
    for s in {r["output"] for r in corpus if r["meta_template"] == "he_who"}:
        verb = re.match(r"(?:He|She) who (\w+) (his|her) ", s)
        assert verb and verb.group(1).endswith("s"), s  # "He who mends his nets"
    for s in {r["output"] for r in corpus if r["meta_template"] == "where_there_is"}:
        assert re.match(r"Where there (is an? |are (?!an? )\w+ \w+s,)", s), s
    for s in {r["output"] for r in corpus if r["meta_template"] == "today_tomorrow"}:
        for verb in re.findall(r"\b(?:you|we) (\w+)", s):
            assert not verb.endswith("s"), s  # "The nets we mend", never "we mends"


# --- statistics --------------------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("  Hello,   World! ") == "hello world"
    assert normalize_text("Don't — stop…\n\tNOW") == "dont stop now"
    assert normalize_text("«Straße»") == "strasse"  # casefold, and guillemets are punctuation
    assert normalize_text("¿Qué? $5 + 3") == "qué $5 + 3"  # symbols are not punctuation
    assert normalize_text("") == "" and normalize_text(" ... ") == ""


def test_distinct_n():
    texts = ["The cat sat.", "the CAT ran!"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the cat sat the cat ran
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 4) == 0.0  # no text has four words
    assert distinct_n(["a", "a"], 2) == 0.0  # n-grams never span two texts
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_repeat_rate():
    assert repeat_rate(["A cat.", "a  cat", "A dog", "a CAT!"]) == 0.5
    assert repeat_rate(["one", "two", "three"]) == 0.0
    assert repeat_rate(["same", "same", "same", "same"]) == 0.75
    assert repeat_rate([]) == 0.0


def test_family_balance():
    records = [
        {"meta_template": "b", "t": "x"},
        {"meta_template": "a", "t": "x"},
        {"meta_template": "b", "t": "y"},
    ]
    records.append({"meta_template": "b", "t": "x"})
    balance = family_balance(records)
    assert balance == {"a": 0.25, "b": 0.75} and list(balance) == ["a", "b"]
    assert family_balance(records, key="t") == {"x": 0.75, "y": 0.25}
    assert family_balance([]) == {}


def test_statistics_of_the_reference_corpus_are_sane(corpus):
    outputs = [r["output"] for r in corpus]
    # Four prompts per saying: the outputs repeat each saying about four times.
    assert 0.74 < repeat_rate(outputs) < 0.76
    assert 0 < distinct_n(outputs, 1) < distinct_n(outputs, 2) < 1
    assert Counter(len(g) for g in groups(corpus)) == {4: 9019, 3: 1}
