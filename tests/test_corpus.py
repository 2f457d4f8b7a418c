"""`prepare` and `inspect` end to end, on the built-in corpus and on broken files, and `fasttune data`."""

import json
import time

import numpy as np
import pytest

from fasttune.cli.main import main
from fasttune.data import corpus, synth, text_stats
from fasttune.data.packing import PackedSampler, TokenizedData, TokenizeOptions, collate, tokenize
from fasttune.data.records import DataError, Example, write_jsonl
from fasttune.models.tokenizer import builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "proverbs.jsonl"
    write_jsonl(path, synth.generate(2000, seed=1))
    return path


def test_prepare_writes_grouped_splits_and_training_arrays(tmp_path, tok, small_corpus):
    r = corpus.prepare([str(small_corpus)], tmp_path / "out", tok)
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["prepare.json", "test.jsonl", "tokenized", "train.jsonl", "val.jsonl"]
    records = {
        s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in corpus.SPLITS
    }
    assert (
        sum(len(v) for v in records.values())
        == r["examples_read"] - r["dedup"]["exact"] - r["dedup"]["normalized"]
    )
    outputs = {s: {text_stats.normalize_text(x["output"]) for x in v} for s, v in records.items()}
    assert not (
        outputs["train"] & outputs["val"]
        or outputs["train"] & outputs["test"]
        or outputs["val"] & outputs["test"]
    )
    raw = set(small_corpus.read_text().splitlines())
    assert all(json.dumps(x, ensure_ascii=False) in raw for x in records["val"])  # records as read
    for s in corpus.SPLITS:
        data = TokenizedData.load(out / "tokenized" / s)
        assert len(data) == len(records[s]) == r["splits"][s]["examples"]
        ids, mask = data.sequence(0)
        assert tok.decode(ids[mask.astype(bool)]) == records[s][0]["output"] + "<|im_end|>"
    assert json.loads((out / "prepare.json").read_text())["packing"] == r["packing"]
    batch = collate(data, next(iter(PackedSampler(data.lengths, 4096))), pad_to=4096)
    assert batch.input_ids.shape == (1, 4096)


def test_a_bad_file_stops_prepare_with_the_report_and_writes_nothing(tmp_path, tok, small_corpus):
    bad = tmp_path / "bad.jsonl"
    lines = small_corpus.read_text().splitlines()[:50]
    lines[9], lines[30] = '{"input": "x"', '{"input": "no output here"}'
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        corpus.prepare([str(bad)], tmp_path / "out", tok)
    assert f"{bad}:10: invalid JSON" in str(info.value) and f"{bad}:31: missing field 'output'" in str(
        info.value
    )
    assert not (tmp_path / "out").exists()
    r = corpus.prepare([str(bad)], tmp_path / "out", tok, corpus.PrepareOptions(skip_bad=True))
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [x["line"] for x in rejects] == [10, 31] and r["rejected_lines"] == 2


def test_examples_over_max_seq_len_are_dropped_into_rejects(tmp_path, tok, small_corpus):
    opts = corpus.PrepareOptions(tokenize=TokenizeOptions(max_seq_len=60))
    r = corpus.prepare([str(small_corpus)], tmp_path / "out", tok, opts)
    dropped = sum(s["dropped"] for s in r["splits"].values())
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert dropped > 0 and len(rejects) == dropped
    assert all("longer than max_seq_len=60 (drop)" in json.loads(x)["reason"] for x in rejects)
    for s in corpus.SPLITS:  # the written records and the arrays still line up one to one
        n = len((tmp_path / "out" / f"{s}.jsonl").read_text().splitlines())
        assert n == len(TokenizedData.load(tmp_path / "out" / "tokenized" / s)) == r["splits"][s]["examples"]


def test_builtin_36k_corpus_packs_above_95_percent(tmp_path, tok, capsys):
    """The reference workload: 36,079 pairs, 16k-token micro-batches. Also prints the preparation time
    (the target is under 30 s on 2 cores; a test never asserts a time)."""
    path = tmp_path / "proverbs.jsonl"
    write_jsonl(path, synth.generate())
    t0 = time.perf_counter()
    r = corpus.prepare([str(path)], tmp_path / "out", tok)
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        lengths = TokenizedData.load(tmp_path / "out" / "tokenized" / "train").lengths
        print(
            f"\nprepare(built-in corpus, {r['examples_read']} pairs): {seconds:.1f} s; train tokens per "
            f"example mean {lengths.mean():.1f}; packing at {r['packing']['budget']}: "
            f"{r['packing']['efficiency']:.2%} "
            f"(batches of 32 padded: {r['packing']['padded_32_efficiency']:.2%})"
        )
    assert r["examples_read"] == 36079
    assert r["packing"]["efficiency"] >= 0.95
    assert r["packing"]["padded_32_efficiency"] < r["packing"]["efficiency"]


def test_inspect_reports_families_lengths_duplicates_and_a_rendered_example(tok, small_corpus):
    text = corpus.inspect([str(small_corpus)], tok)
    assert text.startswith("2000 examples in 1 file(s)")
    for family in synth.TEMPLATE_FAMILIES:
        assert family in text
    for kind in synth.INPUT_TYPES:
        assert kind in text
    assert "duplicates: " in text and "tokens per example (builtin Qwen2.5 tokenizer" in text
    assert "distinct-1 " in text and "distinct-2 " in text and "p50 " in text
    first = json.loads(small_corpus.read_text().splitlines()[0])
    assert f"[[{first['output']}<|im_end|>]]" in text


def test_inspect_flags_small_template_families(tmp_path, tok):
    rows = [
        {"input": f"q{i}", "output": f"Answer number {i}.", "meta_template": "big" if i < 19 else "rare"}
        for i in range(20)
    ]
    write_jsonl(tmp_path / "skewed.jsonl", rows)
    text = corpus.inspect([str(tmp_path / "skewed.jsonl")], tok)
    assert "rare" in text and "<- under 10%" in text.split("rare")[1].splitlines()[0]


def test_data_commands(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "c.jsonl"), "--n", "300", "--seed", "2"]) == 0
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 300
    assert main(["data", "inspect", str(tmp_path / "c.jsonl")]) == 0
    assert "300 examples in 1 file(s)" in capsys.readouterr().out
    assert (
        main(
            [
                "data",
                "prepare",
                str(tmp_path / "c.jsonl"),
                "--out",
                str(tmp_path / "out"),
                "--budget",
                "2048",
                "--system-prompt",
                "none",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "packing at 2048 tokens per micro-batch" in out and (tmp_path / "out" / "prepare.json").exists()
    opts = json.loads((tmp_path / "out" / "prepare.json").read_text())["options"]["tokenize"]
    assert opts["system_prompt"] == "none"
    rows = [{"instruction": f"Name {i}.", "output": f"Thing number {i}."} for i in range(40)]
    write_jsonl(tmp_path / "alpaca.jsonl", rows)
    assert (
        main(
            [
                "data",
                "prepare",
                str(tmp_path / "c.jsonl"),
                str(tmp_path / "alpaca.jsonl"),
                "--weights",
                "1",
                "3",
                "--out",
                str(tmp_path / "mixed"),
                "--budget",
                "2048",
            ]
        )
        == 0
    )
    data = TokenizedData.load(tmp_path / "mixed" / "tokenized" / "train")
    assert sorted(set(data.weight.tolist())) == [1.0, 3.0]
    assert main(["data", "inspect", str(tmp_path / "alpaca.jsonl"), "--format", "io"]) == 2
    assert "missing field 'input'" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "c.jsonl"), "--weights", "1", "2"]) == 2
    assert "--weights has 2 value(s) for 1 file(s)" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"input": "x", "output": ""}\n')
    assert main(["data", "inspect", str(tmp_path / "bad.jsonl")]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:1: empty output" in capsys.readouterr().err
    assert main(["data", "prepare", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_lengths_of_the_reference_unit(tok):
    """The workload's unit as the brief gives it: ~58 tokens per pair with the default system prompt."""
    data, _ = tokenize(
        [
            Example(m)
            for m in (
                [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]
                for r in synth.generate(400, seed=5)
            )
        ],
        tok,
        TokenizeOptions(),
    )
    assert 50 <= float(np.mean(data.lengths)) <= 66
