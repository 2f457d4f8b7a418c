"""The prompts of `fasttune generate`: a JSONL prompt file read into prompt records, each encoded for
the model, and the tokens that end an answer.

`--file` lines (blank lines skipped), each a JSON object with one of:
  "input": "text"                  a user message; an "output" field, if present, is the reference answer
  "messages": [{"role", "content"}, ...]   a conversation ending with a user message; or ending with an
                                   assistant message, which is then the reference and is not part of
                                   the prompt (so a `fasttune data prepare` split file can be used as is)
Every other field is metadata, copied to the output line. Every bad line is reported as `file:line`.
"""

from __future__ import annotations

from pathlib import Path

from fasttune.data.packing import with_system_prompt
from fasttune.data.records import ROLES, DataError, Problem, report
from fasttune.io.jsonl import DEFAULT_MAX_SEQ_LEN, line_byte_limit, parse_json, read_lines


def read_prompt_file(path: Path) -> list[dict]:
    """The prompt records of a JSONL file: {"input" or "messages", "reference"?, "meta"}; every bad line is
    reported at once, as `file:line: reason`."""
    items, problems = [], []
    for line in read_lines(path, "prompt file", line_byte_limit(DEFAULT_MAX_SEQ_LEN)):
        if line.problem:
            problems.append(Problem(str(path), line.number, line.problem, line.text))
            continue
        if not line.text.strip():
            continue
        try:
            items.append(_prompt_record(parse_json(line.text)))
        except ValueError as e:  # LineError included: invalid JSON, duplicate key, lone surrogate, depth
            problems.append(Problem(str(path), line.number, str(e), line.text))
    if problems:
        raise DataError(report(problems, 1), problems)
    if not items:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return items


def _prompt_record(record) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("field 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(
                    f"message {i} must be an object with 'role' ({', '.join(ROLES)}) and 'content' (a string)"
                )
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        reference = None
        if messages[-1]["role"] == "assistant":  # the reference answer, not part of the prompt
            reference = messages.pop()["content"]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("'messages' must end with a user message (or a user message and the answer)")
        meta = {k: v for k, v in record.items() if k != "messages"}
        return {"messages": messages, "reference": reference, "meta": meta}
    if "input" in record:
        if not isinstance(record["input"], str) or not record["input"].strip():
            raise ValueError("field 'input' must be a non-empty string")
        reference = record.get("output")
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"field 'output' must be a string, got {type(reference).__name__}")
        meta = {k: v for k, v in record.items() if k not in ("input", "output")}
        return {"input": record["input"], "reference": reference, "meta": meta}
    raise ValueError(f"no 'input' or 'messages' field (keys: {', '.join(record) or 'none'})")


def encode_prompt(tokenizer, item: dict, system_prompt: str, raw: bool) -> list[int]:
    """The token ids of one prompt record: the chat template with the assistant's turn opened, or (raw) the
    text encoded as it is, with the tokenizer's own special tokens (BOS); a raw conversation is its
    messages' contents joined by newlines."""
    if raw:
        text = item["input"] if "input" in item else "\n".join(m["content"] for m in item["messages"])
        return tokenizer.encode(text, add_special_tokens=True)
    messages = item.get("messages") or [{"role": "user", "content": item["input"]}]
    messages = with_system_prompt(messages, system_prompt, tokenizer)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's stop tokens (turn ends, eos), plus generation_config.json's eos_token_id."""
    ids = list(tokenizer.stop_token_ids)
    eos = model.info.generation_config.get("eos_token_id")
    for t in eos if isinstance(eos, list) else [eos]:
        if isinstance(t, int) and t not in ids:
            ids.append(t)
    return ids
