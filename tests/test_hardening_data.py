"""Issue 14, items 4-7: bad data lines are each one problem naming their line, never a crash or a silent
acceptance; positions restarting inside a row are packed sequences in the public logits/loss."""

import json
import os

import pytest
import torch

import fasttune
from fasttune.cli.main import main
from fasttune.data import corpus
from fasttune.data.packing import TokenizeOptions
from fasttune.data.records import DataError, read_jsonl, read_sources
from fasttune.eval.evaluate import read_records
from fasttune.eval.judge import JudgeCache
from fasttune.eval.prompts import read_prompt_file
from fasttune.models.tokenizer import builtin_tokenizer
from helpers import FAMILIES, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Every character that str.splitlines() splits at and that JSON allows raw inside a string.
SEPARATORS = "\u2028\u2029\u0085"


def line(record) -> str:
    return json.dumps(record, ensure_ascii=False)


def write_lines(path, lines, newline="\n"):
    path.write_bytes(
        b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + newline.encode() for x in lines)
    )
    return path


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def rejects(out):
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").split("\n") if x]


# ----------------------------------------------------------------------------------------------------------
# Item 4: lines end at "\n" only


def test_item04_unicode_line_separators_stay_in_one_record(tmp_path):
    f = write_lines(
        tmp_path / "sep.jsonl",
        [
            line({"input": f"a{SEPARATORS}b", "output": f"one{SEPARATORS}two"}),
            '{"input": "unterminated',
            line({"input": "third", "output": "fine"}),
        ],
    )
    examples, problems = read_jsonl(f)
    assert [(e.line, e.messages[1]["content"]) for e in examples] == [(1, f"one{SEPARATORS}two"), (3, "fine")]
    assert [(p.line, p.reason.split(":")[0]) for p in problems] == [(2, "invalid JSON")]
    # CRLF files: the "\r" goes with the line ending, not into the record
    crlf = write_lines(tmp_path / "crlf.jsonl", [line({"input": "x\u2028", "output": "y"})] * 2, "\r\n")
    examples, problems = read_jsonl(crlf)
    assert not problems and [e.raw for e in examples] == [line({"input": "x\u2028", "output": "y"})] * 2


def test_item04_skip_bad_rejects_hold_whole_lines(tmp_path, tok):
    bad = line({"input": f"no{SEPARATORS}output"})
    good = [line({"input": f"q{i}\u2028", "output": f"answer {i}\u0085"}) for i in range(6)]
    f = write_lines(tmp_path / "d.jsonl", good[:3] + [bad] + good[3:])
    with pytest.raises(DataError) as info:
        read_sources([f])
    assert [str(p) for p in info.value.problems] == [
        f"{f}:4: missing field 'output' (format io detected at line 1)"
    ]
    out = tmp_path / "out"
    corpus.prepare([str(f)], out, tok, corpus.PrepareOptions(skip_bad=True, ratios=(1, 0, 0)))
    (row,) = rejects(out)
    assert row == {"file": str(f), "line": 4, "reason": row["reason"], "text": bad}
    written = (out / "train.jsonl").read_text(encoding="utf-8").split("\n")
    assert written == good + [""]


def test_item04_every_jsonl_reader_keeps_line_separators(tmp_path):
    split_file = write_lines(tmp_path / "test.jsonl", [line({"input": f"a{SEPARATORS}", "output": "b"})] * 2)
    assert [(e.line, e.messages[0]["content"]) for e in read_records(split_file)] == [
        (1, f"a{SEPARATORS}"),
        (2, f"a{SEPARATORS}"),
    ]
    prompts = write_lines(tmp_path / "p.jsonl", [line({"input": f"p{SEPARATORS}q"}), line({"input": "r"})])
    assert [p["input"] for p in read_prompt_file(prompts)] == [f"p{SEPARATORS}q", "r"]
    cache_file = tmp_path / "c.judge.jsonl"
    write_lines(cache_file, [line({"key": "k1", "score": 4, "reason": f"x{SEPARATORS}y"})])
    cache = JudgeCache(cache_file)
    assert set(cache.records) == {"k1"} and cache.records["k1"]["reason"] == f"x{SEPARATORS}y"
    cache.add({"key": "k2", "score": 1})
    assert [json.loads(x)["key"] for x in cache_file.read_text(encoding="utf-8").split("\n") if x] == [
        "k1",
        "k2",
    ]


# ----------------------------------------------------------------------------------------------------------
# Item 5: one bad line never stops the file


def test_item05_lone_surrogate_is_a_line_problem_not_a_tokenizer_crash(tmp_path, tok):
    f = write_lines(
        tmp_path / "s.jsonl",
        [
            line({"input": "hello", "output": "world"}),
            '{"input": "hi", "output": "bad \\ud800 half"}',
            '{"input": "x", "output": "fine \\ud83d\\ude00 pair"}',  # an escaped surrogate pair is valid
            '{"input": "y", "output": "z", "meta": {"k\\udfff": 1}}',
            '{"input": 1, "output": "also bad"}',
        ],
    )
    with pytest.raises(DataError) as info:
        corpus.prepare([str(f)], tmp_path / "o1", tok)
    assert [str(p) for p in info.value.problems] == [
        f"{f}:2: invalid unicode (lone surrogate \\ud800) in 'output'",
        f"{f}:4: invalid unicode (lone surrogate \\udfff) in a key of 'meta'",
        f"{f}:5: field 'input' must be a string, got int (format io detected at line 1)",
    ]
    assert not (tmp_path / "o1").exists()
    out = tmp_path / "o2"
    r = corpus.prepare([str(f)], out, tok, corpus.PrepareOptions(skip_bad=True, ratios=(1, 0, 0)))
    assert r["splits"]["train"]["examples"] == 2 and [x["line"] for x in rejects(out)] == [2, 4, 5]


def test_item05_deep_nesting_is_a_line_problem(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    f = write_lines(
        tmp_path / "n.jsonl",
        [
            deep,
            line({"input": "a", "output": "b"}),
            '{"input": "a", "output": "c", "meta": ' + deep + "}",
            line({"input": "a", "output": "d", "meta": json.loads("[" * 150 + "]" * 150)}),
        ],
    )
    examples, problems = read_jsonl(f)
    assert [e.line for e in examples] == [2]
    assert [p.line for p in problems] == [1, 3, 4]
    assert all("nested deeper than 100 levels" in p.reason for p in problems), problems


def test_item05_invalid_utf8_byte_is_a_problem_of_its_line(tmp_path):
    f = write_lines(
        tmp_path / "latin1.jsonl",
        [
            line({"input": "a", "output": "b"}),
            '{"input": "caf\xe9", "output": "x"}'.encode("latin-1"),
            line({"input": "c", "output": "d"}),
        ],
    )
    with pytest.raises(DataError) as info:
        read_sources([f])
    assert [str(p) for p in info.value.problems] == [
        f"{f}:2: not UTF-8 text (invalid continuation byte at byte 14 of the line)"
    ]
    examples, problems = read_sources([f], skip_bad=True)
    assert [e.line for e in examples] == [1, 3]
    assert problems[0].text == '{"input": "caf\\xe9", "output": "x"}'  # the byte shown, the rest kept


def test_item05_overlong_line_is_refused_by_its_bytes_before_parsing(tmp_path, tok):
    from fasttune.io.jsonl import line_byte_limit, read_lines

    limit = line_byte_limit(64)
    assert limit == 384 * 64 + 2**20
    huge = '{"input": "' + "x" * (3 * 2**20) + '", "output": "y"'  # invalid JSON at its very end
    f = write_lines(tmp_path / "big.jsonl", [line({"input": "a", "output": "b"}), huge, huge + "}"])
    opts = corpus.PrepareOptions(skip_bad=True, ratios=(1, 0, 0), tokenize=TokenizeOptions(max_seq_len=64))
    out = tmp_path / "out"
    r = corpus.prepare([str(f)], out, tok, opts)
    assert r["splits"]["train"]["examples"] == 1
    rows = rejects(out)
    kept = "its first 4096 bytes are kept"
    assert [(x["line"], x["reason"]) for x in rows] == [
        (2, f"line of {len(huge)} bytes, over the limit of {limit} bytes for max_seq_len=64; {kept}"),
        (3, f"line of {len(huge) + 1} bytes, over the limit of {limit} bytes for max_seq_len=64; {kept}"),
    ]
    assert all(x["text"] == huge[:4096] for x in rows)
    # a line exactly at the limit is read, one byte over is not
    at_limit = line({"input": "a", "output": "b" * (limit - len(line({"input": "a", "output": ""})))})
    assert len(at_limit.encode()) == limit
    f2 = write_lines(tmp_path / "edge.jsonl", [at_limit, "{}"])
    assert [(x.number, x.text == at_limit, x.problem) for x in read_lines(f2, "data file", limit)] == [
        (1, True, None),
        (2, False, None),
    ]
    (first, _) = read_lines(f2, "data file", limit - 1)
    assert first.problem == f"line of {limit} bytes, over the limit of {limit - 1} bytes; {kept}"


def test_item05_a_folder_or_device_as_the_data_file_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match=f"^{tmp_path}: is a folder, not a data file$"):
        read_sources([tmp_path])
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"fasttune: error: {tmp_path}: is a folder, not a data file\n"
    if os.path.exists("/dev/null"):
        with pytest.raises(DataError, match="^/dev/null: not a regular file"):
            read_sources(["/dev/null"])
    with pytest.raises(DataError, match="is a folder, not a prompt file"):
        read_prompt_file(tmp_path)
    with pytest.raises(DataError, match="is a folder, not a split file"):
        read_records(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Item 6: nothing silently accepted


def test_item06_duplicate_keys_are_refused(tmp_path):
    f = write_lines(
        tmp_path / "dup.jsonl",
        [
            '{"input": "a", "output": "first", "output": "second"}',
            '{"messages": [{"role": "user", "content": "a", "content": "b"}, '
            '{"role": "assistant", "content": "c"}]}',
            line({"input": "fine", "output": "ok"}),
        ],
    )
    _, problems = read_jsonl(f)
    assert [str(p) for p in problems] == [
        f"{f}:1: duplicate key 'output'",
        f"{f}:2: duplicate key 'content'",
    ]


@pytest.mark.parametrize(
    "invisible",
    ["\u200b", "\u200b\u2060\ufeff", "\u00a0\u3000", "\u2028", " \t\u200d\u00ad ", "\x00\x1f"],
    ids=["zwsp", "joiners-bom", "nbsp-ideographic", "line-sep", "mixed", "controls"],
)
def test_item06_output_with_no_visible_character_is_empty(tmp_path, invisible):
    f = write_lines(
        tmp_path / "inv.jsonl",
        [
            line({"input": "a", "output": invisible}),
            line({"input": invisible, "output": "b"}),
            line(
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": invisible}]}
            ),
            line({"input": "a", "output": f"{invisible}x"}),  # one visible character is enough
        ],
    )
    examples, problems = read_jsonl(f, "io")
    assert [p.reason for p in problems[:2]] == ["empty output", "empty field 'input'"]
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": invisible}]
    _, problems = read_jsonl(write_lines(tmp_path / "m.jsonl", [line({"messages": conversation})]))
    assert [p.reason for p in problems] == ["empty output (message 1) (format messages detected at line 1)"]
    assert [e.line for e in read_jsonl(f)[0]] == [4]
    for visible in ("\u0301", "\U0001f600", "ok"):  # a combining mark or an emoji is something to read
        assert read_jsonl(write_lines(tmp_path / "v.jsonl", [line({"input": "a", "output": visible})]))[0]


def test_item06_no_usable_examples_is_an_error_even_with_skip_bad(tmp_path, tok, capsys):
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    bad = write_lines(tmp_path / "bad.jsonl", ['{"input": "x"}', "[1]"])
    good = write_lines(
        tmp_path / "good.jsonl", [line({"input": f"q{i}", "output": f"a{i}"}) for i in range(5)]
    )
    with pytest.raises(DataError, match=f"^no usable examples in {empty}:"):
        read_sources([empty], skip_bad=True)
    # a file that gives nothing is an error even beside good ones: --skip-bad skips lines, not files
    with pytest.raises(DataError) as info:
        read_sources([good, bad, empty], skip_bad=True)
    text = str(info.value)
    assert text.startswith(f"no usable examples in {bad}, {empty}: ")
    assert f"{bad}:1: missing field 'output'" in text and f"{empty}:0: no records (the file is empty)" in text
    out = tmp_path / "out"
    assert main(["data", "prepare", str(bad), "--out", str(out), "--skip-bad"]) == 2
    assert capsys.readouterr().err.startswith(f"fasttune: error: no usable examples in {bad}: ")
    assert not out.exists()
    # everything dropped by the length policy: nothing to train on either
    with pytest.raises(DataError, match=f"^no usable examples in {good}: all 5 were dropped"):
        corpus.prepare([str(good)], out, tok, corpus.PrepareOptions(tokenize=TokenizeOptions(max_seq_len=4)))
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# Item 7: positions restarting inside a row are sequence starts


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = write_checkpoint(path, request.param)
    return request.param, ref, fasttune.load_model(path, dtype=torch.float32)


def _packed(lens, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
    pos = torch.cat([torch.arange(n) for n in lens])
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, torch.cat(seqs), pos, cu


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_item07_restarting_position_ids_are_packed_sequences(family_pair):
    family, ref, ours = family_pair
    lens = [5, 11, 1, 20]  # the last is longer than Mistral's window of 16
    seqs, ids, pos, cu = _packed(lens, ref.config.vocab_size, 3)
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    with torch.no_grad():
        got = ours.logits(ids[None], position_ids=pos[None])[0]
        explicit = ours.logits(ids[None], position_ids=pos[None], cu_seqlens=cu)[0]
        torch.testing.assert_close(got, explicit, rtol=0, atol=0)
        for s, e, seq in zip(cu[:-1], cu[1:], seqs, strict=True):
            assert rel_err(got[s:e], ours.logits(seq[None])[0]) < 1e-5, family
        # transformers' own packed-position behaviour (no attention mask and no cache: restarts start
        # sequences)
        assert rel_err(got, ref(ids[None], position_ids=pos[None], use_cache=False).logits[0]) < 1e-5, family
        loss = ours.loss(ids[None], targets[None], position_ids=pos[None])
        assert loss.item() == ours.loss(ids[None], targets[None], pos[None], cu).item()


def test_item07_rows_of_a_batch_are_packed_each_on_its_own(family_pair):
    family, ref, ours = family_pair
    rows = [
        _packed(lens, ref.config.vocab_size, seed) for lens, seed in (([7, 9], 5), ([16], 6), ([3, 4, 9], 7))
    ]
    ids = torch.stack([r[1] for r in rows])
    pos = torch.stack([r[2] for r in rows])
    with torch.no_grad():
        got = ours.logits(ids, position_ids=pos)
        assert got.shape == (3, 16, ref.config.vocab_size)
        for b, (_, row_ids, row_pos, cu) in enumerate(rows):
            alone = ours.logits(row_ids[None], position_ids=row_pos[None], cu_seqlens=cu)[0]
            assert rel_err(got[b], alone) < 1e-5, (family, b)
        assert rel_err(got, ref(ids, position_ids=pos, use_cache=False).logits) < 1e-5, family
        # a jump that is not a restart at 0 is a boundary too, as transformers' masks make it
        jump = torch.cat([torch.arange(6), torch.arange(10, 20)])[None]
        expected = ref(ids[:1], position_ids=jump, use_cache=False).logits
        assert rel_err(ours.logits(ids[:1], position_ids=jump), expected) < 1e-5, family
        # one run per row (the usual 0..T-1, or offset positions) is left as it is
        plain = torch.arange(16).expand(3, 16)
        torch.testing.assert_close(ours.logits(ids, position_ids=plain), ours.logits(ids), rtol=0, atol=0)


def test_item07_position_ids_of_another_shape_are_an_error(family_pair):
    _, _, ours = family_pair
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position_ids \(3, 6\) do not match input_ids \(2, 6\)"):
        ours.logits(ids, position_ids=torch.zeros(3, 6, dtype=torch.long))
