"""Reading, validating, deduplicating and splitting instruction data."""

import json
import os

import pytest

from fasttune.data.records import (
    DataError,
    Source,
    count_near_duplicates,
    dedup,
    read_jsonl,
    read_sources,
    split,
    write_jsonl,
    write_rejects,
)


def write(path, lines):
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n"
    )
    return path


def test_three_formats_become_conversations_with_metadata(tmp_path):
    io = write(
        tmp_path / "io.jsonl",
        [
            {
                "input": "Say a proverb.",
                "output": "Haste makes waste.",
                "meta_template": "t1",
                "source_words": ["haste"],
            }
        ],
    )
    msgs = write(
        tmp_path / "m.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be wise."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                ],
                "id": 7,
            }
        ],
    )
    alpaca = write(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate.", "input": "кот", "output": "cat"},
            {"instruction": "Name a color.", "input": "", "output": "Red."},
            {"instruction": "Name a fruit.", "output": "Pear."},
        ],
    )
    (e,), _ = read_jsonl(io)
    assert e.messages == [
        {"role": "user", "content": "Say a proverb."},
        {"role": "assistant", "content": "Haste makes waste."},
    ]
    assert e.meta == {"meta_template": "t1", "source_words": ["haste"]} and e.line == 1
    (m,), _ = read_jsonl(msgs)
    assert [x["role"] for x in m.messages] == ["system", "user", "assistant"] and m.meta == {"id": 7}
    a, _ = read_jsonl(alpaca)
    assert [x.messages[0]["content"] for x in a] == ["Translate.\n\nкот", "Name a color.", "Name a fruit."]
    # a named format overrides detection
    _, problems = read_jsonl(io, "alpaca")
    assert "missing field 'instruction'" in problems[0].reason


def test_every_bad_line_is_reported_with_file_line_and_reason(tmp_path):
    f = write(
        tmp_path / "bad.jsonl",
        [
            {"input": "ok", "output": "fine"},  # 1: good, fixes the format to io
            '{"input": "unterminated',  # 2
            "[1, 2]",  # 3
            {"input": "no output"},  # 4
            {"input": 5, "output": "x"},  # 5
            {"input": "x", "output": "   "},  # 6
            "",  # 7: blank lines are skipped
            {"input": "fine too", "output": "ok"},  # 8
        ],
    )
    m = write(
        tmp_path / "bad_messages.jsonl",
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},  # 1 good
            {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]},  # 2
            {"messages": [{"role": "user", "content": "a"}]},  # 3
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},  # 4
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},  # 5
            {"messages": "hello"},  # 6
            {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},  # 7
        ],
    )
    with pytest.raises(DataError) as info:
        read_sources([f, m])
    text = str(info.value)
    expected = [
        (f, 2, "invalid JSON"),
        (f, 3, "expected a JSON object, got list"),
        (f, 4, "missing field 'output'"),
        (f, 5, "field 'input' must be a string, got int"),
        (f, 6, "empty output"),
        (m, 2, "bad order of roles: assistant, user"),
        (m, 3, "bad order of roles: user"),
        (m, 4, "message 1: role 'bot' is not one of system, user, assistant"),
        (m, 5, "empty output (message 1)"),
        (m, 6, "field 'messages' must be a list"),
        (m, 7, "message 0: 'content' must be a string, got list"),
    ]
    assert text.startswith(f"{len(expected)} problem(s) in 2 of 2 file(s):")
    for path, line, reason in expected:
        assert f"{path}:{line}: {reason}" in text
    assert [(p.file, p.line) for p in info.value.problems] == [(str(p), n) for p, n, _ in expected]

    examples, problems = read_sources([f, m], skip_bad=True)
    assert [(e.file, e.line) for e in examples] == [(str(f), 1), (str(f), 8), (str(m), 1)]
    write_rejects(tmp_path / "rejects.jsonl", problems)
    rows = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert len(rows) == len(expected)
    assert rows[0] == {
        "file": str(f),
        "line": 2,
        "reason": rows[0]["reason"],
        "text": '{"input": "unterminated',
    }


def test_unreadable_inputs(tmp_path):
    with pytest.raises(DataError, match="nothing.jsonl: data file not found"):
        read_sources([tmp_path / "nothing.jsonl"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl:0: no records"):
        read_sources([tmp_path / "empty.jsonl"])
    write(tmp_path / "odd.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="odd.jsonl:1: cannot tell the format.*keys: prompt, completion"):
        read_sources([tmp_path / "odd.jsonl"])
    (tmp_path / "latin1.jsonl").write_bytes('{"input": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    # a bad byte is a problem of its line (issue 14 item 5), no longer of the whole file
    with pytest.raises(DataError, match="latin1.jsonl:1: not UTF-8 text"):
        read_sources([tmp_path / "latin1.jsonl"])
    with pytest.raises(DataError, match="weight must be >= 0"):
        read_sources([Source(str(tmp_path / "odd.jsonl"), weight=-1)])


def test_sources_carry_their_weight(tmp_path):
    f = write(tmp_path / "w.jsonl", [{"input": "a", "output": "b"}])
    examples, _ = read_sources([Source(str(f), weight=2.5), str(f)])
    assert [e.weight for e in examples] == [2.5, 1.0]


def _ex(prompt, output, **meta):
    from fasttune.data.records import Example

    return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], meta)


def test_dedup_exact_normalised_and_near():
    examples = [
        _ex("Tell me about rain.", "Rain feeds the patient field."),
        _ex("Tell me about rain.", "Rain feeds the patient field."),  # exact
        _ex("tell me  about RAIN", "Rain feeds the patient field!"),  # normalised
        _ex("Tell me about snow.", "Rain feeds the patient field."),  # same output, other prompt: kept
        _ex("Tell me about wind.", "Wind feeds the patient field."),  # one word away: counted, kept
        _ex("Tell me about stone.", "A stone remembers every river it met."),
    ]
    kept, stats = dedup(examples)
    assert len(kept) == 4 and stats.exact == 1 and stats.normalized == 1
    assert stats.near_duplicate_responses == 2  # "rain feeds ..." and "wind feeds ..."


@pytest.mark.parametrize(
    "texts, expected",
    [
        (["a b c", "a x c"], 2),  # substitution
        (["a b c", "a b c d"], 2),  # insertion
        (["a b c", "b c"], 2),  # deletion at the start
        (["a b c", "a x y"], 0),  # two words away
        (["a b c", "a b c"], 0),  # identical texts are duplicates, not near-duplicates
        (["one two three", "one two four", "zero two four", "nine nine nine"], 3),
    ],
)
def test_count_near_duplicates(texts, expected):
    assert count_near_duplicates(texts) == expected


def _corpus(n_outputs=300, prompts_per_output=4, families=("a", "b", "c")):
    return [
        _ex(f"prompt {j} for {i}", f"Saying number {i} is wise.", meta_template=families[i % len(families)])
        for i in range(n_outputs)
        for j in range(prompts_per_output)
    ]


def test_split_is_grouped_stratified_and_deterministic():
    examples = _corpus()
    parts = split(examples, seed=0)
    outputs = {s: {e.response for e in parts[s]} for s in parts}
    assert not outputs["train"] & outputs["val"] and not outputs["train"] & outputs["test"]
    assert not outputs["val"] & outputs["test"]
    assert sum(len(p) for p in parts.values()) == len(examples)
    assert abs(len(parts["train"]) / len(examples) - 0.9) < 0.02
    for family in "abc":  # each stratum keeps the ratios
        in_family = [e for e in examples if e.meta["meta_template"] == family]
        val = [e for e in parts["val"] if e.meta["meta_template"] == family]
        assert abs(len(val) / len(in_family) - 0.05) < 0.02
    again = split(examples, seed=0)
    assert [id(e) for e in again["test"]] == [id(e) for e in parts["test"]]
    other = split(examples, seed=1)
    assert {e.response for e in other["test"]} != outputs["test"]


def test_split_groups_normalised_outputs_and_validates_ratios():
    examples = [_ex("p1", "Bread is gold."), _ex("p2", "bread is GOLD"), _ex("p3", "Salt is silver.")] * 1
    for seed in range(5):
        parts = split(examples, ratios=(0.5, 0.5, 0.0), seed=seed, stratify_key=None)
        where = {e.messages[0]["content"]: s for s, es in parts.items() for e in es}
        assert where["p1"] == where["p2"] and not parts["test"]
    with pytest.raises(DataError, match="split ratios"):
        split(examples, ratios=(0.9, 0.2, 0.0))


def test_write_jsonl_round_trips_and_leaves_no_temporary_file(tmp_path):
    records = [{"input": "Tell me about rain.", "output": "Rain feeds the field."}] * 3 + [
        {"input": "Café — ¿qué?", "output": "Ünïcode ✓.", "n": [1, 2]}
    ]
    path = tmp_path / "out.jsonl"
    path.write_text("an older file\n", encoding="utf-8")
    write_jsonl(path, records)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert "Café — ¿qué?" in lines[-1], "written as UTF-8, not \\u escapes"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_write_jsonl_interrupted_keeps_the_old_file(tmp_path):
    def records():
        yield {"input": "a", "output": "b"}
        raise RuntimeError("interrupted")

    path = tmp_path / "out.jsonl"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="interrupted"):
        write_jsonl(str(path), records())
    assert path.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]
