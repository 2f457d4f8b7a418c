"""Evaluation metrics on hand-made inputs with hand-computed values; the split loss against a per-example
computation; prompts, `evaluate_run` against the no-cache greedy reference; `fasttune eval` end to end on
a tiny model and a tiny prepared corpus, with the judge served by a local HTTP server."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fasttune
from fasttune.cli.main import main
from fasttune.data import corpus, synth
from fasttune.data.packing import TokenizedData, TokenizeOptions, tokenize
from fasttune.data.records import Example, write_jsonl
from fasttune.eval.evaluate import (
    classify_family,
    distinctive_ngrams,
    evaluate_run,
    generation_metrics,
    instruction_text,
    load_split,
    memorised,
    prompt_ids,
    split_loss,
    template_coverage,
)
from fasttune.eval.generation import greedy_nocache
from fasttune.models.tokenizer import write_builtin_tokenizer
from helpers import hf_model
from test_judge import server  # noqa: F401 (the local judge server fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TRAIN = ["Better a goat than a horse.", "He who feeds a goat eats.", "Better a cow than a horse."]
TRAIN_FAMILIES = ["better_than", "he_who", "better_than"]


def test_memorisation_compares_normalised_text():
    gens = ["a FAT goat", "He who waits wins!", "A thin goat.", "", "  "]
    train = ["A fat goat.", "He who waits, wins.", "Something else"]
    assert memorised(gens, train) == [True, True, False, False, False]


def test_distinctive_ngrams_and_family_classification_by_hand():
    d = distinctive_ngrams(TRAIN, TRAIN_FAMILIES)
    # ("a", "goat") is in both families, so in neither set.
    assert d["better_than"] == {("^", "better"), ("better", "a"), ("goat", "than"), ("than", "a"),
                                ("a", "horse"), ("a", "cow"), ("cow", "than")}  # fmt: skip
    assert d["he_who"] == {("^", "he"), ("he", "who"), ("who", "feeds"), ("feeds", "a"), ("goat", "eats")}
    assert classify_family("Better a pig than a goat.", d) == "better_than"  # 3 hits against 0
    assert classify_family("He who owns a cow.", d) == "he_who"  # 2 hits against 1 ("a cow")
    assert classify_family("A goat.", d) is None  # no distinctive bigram
    assert classify_family("who feeds than a", d) is None  # 1 against 1: a tie
    assert classify_family("", d) is None


def test_template_coverage_by_hand():
    gens = ["Better a pig than a goat.", "Better a hen than a cow.", "A goat.", ""]
    families = ["better_than", "he_who", "he_who", "never_before"]
    tc = template_coverage(gens, families, TRAIN, TRAIN_FAMILIES)
    assert tc["families"] == {
        "better_than": {"prompts": 1, "nonempty": 1, "generated": 2, "own": 1},
        "he_who": {"prompts": 2, "nonempty": 2, "generated": 0, "own": 0},
        "never_before": {"prompts": 1, "nonempty": 0, "generated": 0, "own": 0},
    }
    assert tc["coverage"] == pytest.approx(1 / 3) and tc["covered"] == 1
    assert tc["agreement"] == pytest.approx(1 / 4)
    assert tc["unassigned"] == 2 and tc["generated_outside"] == {}
    # A generation of a family that no prompt had is counted outside.
    tc = template_coverage(["He who sleeps."], ["better_than"], TRAIN, TRAIN_FAMILIES)
    assert tc["coverage"] == 0 and tc["generated_outside"] == {"he_who": 1}


def test_generation_metrics_by_hand():
    gens = ["The cat sat.", "the cat ran", ""]
    m = generation_metrics(gens, [4, 3, 0], ["The cat sat"], [None, None, None])
    assert m["distinct_1"] == pytest.approx(4 / 6)  # the cat sat the cat ran
    assert m["distinct_2"] == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert m["mean_tokens"] == pytest.approx(7 / 3)
    assert m["mean_words"] == pytest.approx(2.0)
    assert m["empty"] == 1
    assert m["memorised"] == pytest.approx(1 / 3) and m["memorised_count"] == 1
    assert m["template_coverage"] is None
    # Only prompts with a family count for coverage; training outputs without one are left out.
    m = generation_metrics(
        ["Better a hen than a cow.", "x"],
        [1, 1],
        TRAIN + ["He who"],
        ["better_than", None],
        TRAIN_FAMILIES + [None],
    )
    assert m["template_coverage"]["families"] == {
        "better_than": {"prompts": 1, "nonempty": 1, "generated": 1, "own": 1}
    }
    empty = generation_metrics([], [], TRAIN)
    assert empty["examples"] == 0 and empty["mean_tokens"] is None and empty["distinct_1"] == 0.0


def test_instruction_text():
    assert instruction_text([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]) == "Hi"
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert instruction_text(turns) == "User: a\nAssistant: b\nUser: c"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_model("qwen2_untied", seed=1).save_pretrained(path)
    return fasttune.load_model(path)


def _data(seqs: list[tuple[list[int], list[int]]]) -> TokenizedData:
    ids = np.array([t for s, _ in seqs for t in s], np.uint32)
    mask = np.array([t for _, m in seqs for t in m], np.uint8)
    offsets = np.cumsum([0] + [len(s) for s, _ in seqs]).astype(np.int64)
    return TokenizedData(ids, mask, offsets, np.arange(len(seqs)))


def test_split_loss_is_the_token_weighted_mean_over_every_example(tiny):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (7, 12, 30, 5, 9):  # 30 tokens: longer than the 16-token rows, gets a row of its own
        ids = torch.randint(0, 101, (n,), generator=g).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        seqs.append((ids, mask))
    data = _data(seqs)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in seqs:
            logits = tiny.logits(torch.tensor([ids]))[0, :-1].double()
            trained = torch.tensor(mask[1:], dtype=torch.bool)
            total += F.cross_entropy(logits[trained], torch.tensor(ids[1:])[trained], reduction="sum").item()
            count += int(trained.sum())
    r = split_loss(tiny, data, micro_batch_tokens=16)
    assert r["targets"] == count and r["examples"] == 5
    assert r["loss"] == pytest.approx(total / count, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert split_loss(tiny, data, micro_batch_tokens=4096)["loss"] == pytest.approx(r["loss"], rel=1e-5)
    bf16 = split_loss(tiny, data, micro_batch_tokens=16, autocast_dtype=torch.bfloat16)
    assert bf16["loss"] == pytest.approx(r["loss"], rel=0.02) and bf16["loss"] != r["loss"]
    assert not tiny.training
    assert split_loss(tiny, _data([])) == {"loss": None, "perplexity": None, "targets": 0, "examples": 0}


def _conv(*texts):
    roles = ["user", "assistant"] * len(texts)
    return Example([{"role": r, "content": t} for r, t in zip(roles, texts, strict=False)])


@pytest.mark.parametrize("train_on_input", [False, True])
def test_prompts_are_the_tokens_before_the_last_response(qwen_tokenizer_dir, train_on_input):
    tok = fasttune.load_tokenizer(qwen_tokenizer_dir)
    examples = [
        _conv("Say a proverb.", "Better late than never."),
        _conv("Hi", "Hello!", "And again?", "Again."),
    ]
    data, _ = tokenize(examples, tok, TokenizeOptions(train_on_input=train_on_input))
    for i, e in enumerate(examples):
        expected = tok.encode_chat(e.messages[:-1], add_generation_prompt=True).ids
        prompt = prompt_ids(data, i, e, tok)
        assert prompt == expected
        assert tok.decode(data.sequence(i)[0][len(prompt) :]) == e.response + "<|im_end|>\n"


# ----------------------------------------------------------------------------------------------------------
# A tiny model on a tiny prepared corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, qwen_tokenizer_dir):
    """OUT/ as a run leaves it: model/ (a tiny random Qwen2 with Qwen2.5's tokenizer) and data/."""
    root = tmp_path_factory.mktemp("eval")
    write_jsonl(root / "corpus.jsonl", synth.generate(80, seed=5))
    tok = fasttune.load_tokenizer(qwen_tokenizer_dir)
    opts = corpus.PrepareOptions(ratios=(0.8, 0.1, 0.1), stratify_key=None)  # 2 sayings (8 examples) each
    corpus.prepare([str(root / "corpus.jsonl")], root / "run" / "data", tok, opts)
    for name, seed in (("model", 0), ("other", 1)):
        hf_model("qwen2_tied", seed=seed, vocab_size=151936).save_pretrained(root / "run" / name)
        write_builtin_tokenizer(root / "run" / name)
    return root / "run"


def test_evaluate_run_generates_what_the_reference_decoder_does(prepared, tmp_path):
    model = fasttune.load_model(prepared / "model")
    tok = fasttune.load_tokenizer(prepared / "model")
    report = evaluate_run(
        model,
        tok,
        prepared / "data",
        max_examples=3,
        max_new_tokens=5,
        micro_batch_tokens=128,
        out=tmp_path / "r.json",
    )
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    data, records = load_split(prepared / "data", "test", tok)
    assert report["examples"] == len(data) == len(records) > 3
    assert report["loss"] == pytest.approx(split_loss(model, data, 4096)["loss"], rel=1e-5)
    gens = report["generations"]
    assert len(gens) == 3
    for i, g in enumerate(gens):
        prompt = prompt_ids(data, i, records[i], tok)
        new = greedy_nocache(model, prompt, 5, tok.stop_token_ids)
        new = [t for t in new if t not in tok.stop_token_ids]
        assert g["generation"] == tok.decode(new).strip() and g["tokens"] == len(new)
        assert g["instruction"] == records[i].messages[0]["content"] and g["reference"] == records[i].response
        assert g["meta_template"] == records[i].meta["meta_template"]
    train = [json.loads(x)["output"] for x in (prepared / "data" / "train.jsonl").read_text().splitlines()]
    families = [
        json.loads(x)["meta_template"] for x in (prepared / "data" / "train.jsonl").read_text().splitlines()
    ]
    expected = generation_metrics(
        [g["generation"] for g in gens],
        [g["tokens"] for g in gens],
        train,
        [g["meta_template"] for g in gens],
        families,
    )
    assert report["metrics"] == json.loads(json.dumps(expected))
    assert report["metrics"]["template_coverage"] is not None


def test_another_tokenizer_gets_the_split_tokenized_again(prepared):
    from fasttune.data.packing import with_system_prompt
    from fasttune.models import builtin

    records = [json.loads(x) for x in (prepared / "data" / "test.jsonl").read_text().splitlines()]
    other = builtin.train_tokenizer([r[k] for r in records for k in ("input", "output")], vocab_size=300)
    data, examples = load_split(prepared / "data", "test", other)
    assert len(data) == len(examples) == len(records)
    for i, e in enumerate(examples):
        expected = other.encode_chat(with_system_prompt(e.messages, "default", other)).ids
        assert data.sequence(i)[0].tolist() == expected
        assert other.decode(prompt_ids(data, i, e, other)).endswith("<|im_start|>assistant\n")


def _rubric_and_pairs_script(prompt):
    if "[Reply A]" in prompt:
        return ("ok", "Verdict: A")  # position bias: every pair ends as a tie
    return ("ok", "Reasonable. Score: 2")


def test_cli_eval_with_a_judge_and_a_comparison_end_to_end(prepared, server, tmp_path, capsys):  # noqa: F811
    server.script = _rubric_and_pairs_script
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Q: {instruction}\nA: {response}\nRef: {reference}\nScore: N")
    out = tmp_path / "eval.json"
    argv = ["eval", "--run", str(prepared), "--max-examples", "3", "--max-new-tokens", "4", "--out", str(out),
            "--compare", str(prepared / "other"), "--judge-url", server.url, "--judge-model", "j",
            "--rubric", str(rubric), "--judge-timeout", "5", "--judge-workers", "2",
            "--micro-batch-tokens", "128"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["model"] == str(prepared / "model") and report["compare"]["model"] == str(
        prepared / "other"
    )
    assert report["loss"] != report["compare"]["loss"]
    for r in (report, report["compare"]):
        assert r["judge"]["scored"] == 3 and r["judge"]["mean"] == 2 and r["judge"]["share_1_2"] == 1
        assert [g["judge"]["value"] for g in r["generations"]] == [2, 2, 2]
    pairs = report["pairwise"]
    identical = pairs["identical"]
    assert pairs["complete"] == 3 and pairs["tie"] == 1 and pairs["consistent"] == (identical / 3)
    asked = len(server.requests)
    assert asked == 3 + 3 + 2 * (3 - identical)
    prompts = [r["body"]["messages"][0]["content"] for r in server.requests]
    for r in (report, report["compare"]):
        for g in r["generations"]:  # every generation was asked about with the rubric filled in
            assert f"Q: {g['instruction']}\nA: {g['generation']}\nRef: {g['reference']}\nScore: N" in prompts
    assert report["judge_settings"]["cache"] == str(tmp_path / "eval.json.judge.jsonl")
    printed = capsys.readouterr().out
    assert "test loss" in printed and "judge: mean 2.00" in printed and "pairwise" in printed
    # Again: every answer comes from the cache.
    server.requests.clear()
    assert main(argv) == 0
    assert server.requests == []
    assert json.loads(out.read_text())["pairwise"] == pairs


def test_cli_eval_defaults_and_errors(prepared, tmp_path, capsys):
    assert main(["eval", "--run", str(prepared), "--max-examples", "2", "--max-new-tokens", "3",
                 "--micro-batch-tokens", "128"]) == 0  # fmt: skip
    report = json.loads((prepared / "eval.json").read_text())
    assert len(report["generations"]) == 2 and "judge" not in report
    v = tmp_path / "v.json"
    model, data = str(prepared / "model"), str(prepared / "data")
    assert main(["eval", "--model", model, "--data", data, "--split", "val", "--max-examples", "0",
                 "--out", str(v), "--micro-batch-tokens", "128"]) == 0  # fmt: skip
    assert json.loads(v.read_text())["split"] == "val"
    capsys.readouterr()
    bad = tmp_path / "bad.txt"
    bad.write_text("{instruction}\n{answer}\n")
    judged = ["--run", str(prepared), "--judge-url", "http://x", "--judge-model", "j"]
    cases = [
        (["--run", str(prepared), "--judge-model", "j"], "--judge-model needs --judge-url"),
        (["--run", str(prepared), "--judge-url", "http://127.0.0.1:9"], "--judge-url needs --judge-model"),
        (["--run", str(prepared), "--judge-url", "http://x", "--judge-model", "j", "--rubric", str(bad)],
         f"{bad}:2: unknown placeholder {{answer}}"),
        (["--model", str(prepared / "model")], "needs --run OUT, or --model DIR and --data DIR"),
        ([*judged, "--pairwise-prompt", str(bad)], "--pairwise-prompt needs --compare"),
        ([*judged, "--judge-cache", str(tmp_path)], "must be a file, not a folder"),
        (["--run", str(tmp_path)], "neither"),
        (["--model", str(prepared / "model"), "--data", str(tmp_path / "none")], "not a folder"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(["eval", *args]) == 2
        assert message in capsys.readouterr().err
