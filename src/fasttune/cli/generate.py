"""`fasttune generate`: answers from a model folder (or a LoRA adapter) to prompts given on the command line
or in a JSONL file, printed or written as JSONL.

    fasttune generate --model out/model "Tell me something about color." "And about rain?"
    fasttune generate --model out/adapter --file prompts.jsonl --out answers.jsonl --temperature 0.7 --seed 0

Each prompt is rendered with the tokenizer's chat template as a user message, with the generation prompt
(the assistant's turn opened), and `--system-prompt` as in `fasttune data`: `default` (the template's
own), `none`, or a text. `--raw` skips the template and encodes the text as it is (for base models).

`--file` lines (blank lines skipped), each a JSON object with one of:
  "input": "text"                  a user message; an "output" field, if present, is the reference answer
  "messages": [{"role", "content"}, ...]   a conversation ending with a user message; or ending with an
                                   assistant message, which is then the reference and is not part of
                                   the prompt (so a `fasttune data prepare` split file can be used as is)
Every other field is metadata, copied to the output line. Every bad line is reported as `file:line`.

Output lines: the prompt's own field ("input" or "messages"), "output" (the generated text; the stop token
is not part of it), "reference" when the line had one, "new_tokens", and "finish_reason": "stop" (a stop
token ended it) or "length" (max-new-tokens did).
"""

from __future__ import annotations

from pathlib import Path

from fasttune.cli.options import add_device, add_dtype, add_sampling, add_system_prompt
from fasttune.errors import FasttuneError

ROLES = ("system", "user", "assistant")


def add_subparser(sub) -> None:
    p = sub.add_parser("generate", help="generate answers to prompts with a model folder or LoRA adapter")
    p.add_argument("prompts", nargs="*", help="prompts, each sent as a user message")
    p.add_argument(
        "--model", type=Path, required=True, help="a Hugging Face model folder, or a LoRA adapter folder"
    )
    p.add_argument("--adapter", type=Path, help="a LoRA adapter folder (PEFT format) over --model")
    p.add_argument("--file", type=Path, help="a JSONL file of prompts: 'input' or 'messages' per line")
    p.add_argument("--out", type=Path, help="write JSONL here (default: print the answers)")
    add_system_prompt(p)
    p.add_argument("--raw", action="store_true", help="encode the prompts as they are, without the template")
    add_sampling(p)
    p.add_argument("--batch-size", type=int, help="prompts per batch (default: up to 64)")
    add_dtype(p)
    add_device(p)


def read_prompt_file(path: Path) -> list[dict]:
    """The prompt records of a JSONL file: {"input" or "messages", "reference"?, "meta"}; every bad line is
    reported at once, as `file:line: reason`."""
    from fasttune.data.records import DataError, Problem, report
    from fasttune.io.jsonl import DEFAULT_MAX_SEQ_LEN, line_byte_limit, parse_json, read_lines

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
    from fasttune.data.packing import with_system_prompt

    if raw:
        text = item["input"] if "input" in item else "\n".join(m["content"] for m in item["messages"])
        return tokenizer.encode(text, add_special_tokens=True)
    messages = item.get("messages") or [{"role": "user", "content": item["input"]}]
    messages = with_system_prompt(messages, system_prompt, tokenizer)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's stop tokens (turn ends, eos), plus generation_config.json's eos_token_id."""
    ids = list(tokenizer.stop_token_ids)
    eos = (getattr(model, "generation_config", None) or {}).get("eos_token_id")
    for t in eos if isinstance(eos, list) else [eos]:
        if isinstance(t, int) and t not in ids:
            ids.append(t)
    return ids


def command(args) -> int:
    from fasttune.data.records import write_jsonl
    from fasttune.eval.generation import generate, load_for_generation

    items = [{"input": p, "reference": None, "meta": {}} for p in args.prompts]
    if args.file is not None:
        items += read_prompt_file(args.file)
    if not items:
        raise FasttuneError("generate: no prompts; give them as arguments or in --file")
    model, tokenizer = load_for_generation(args.model, args.adapter, args.dtype, args.device)
    prompts = [encode_prompt(tokenizer, item, args.system_prompt, args.raw) for item in items]
    new = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop_token_ids=_stop_ids(model, tokenizer),
        seed=args.seed,
        batch_size=args.batch_size,
    )
    records = []
    for item, ids in zip(items, new, strict=True):
        record = dict(item["meta"])
        key = "input" if "input" in item else "messages"
        record[key] = item[key]
        record["output"] = tokenizer.decode(ids)
        if item["reference"] is not None:
            record["reference"] = item["reference"]
        record["new_tokens"] = len(ids)
        # A stop token is not returned: fewer ids than asked for means one ended the answer.
        record["finish_reason"] = "stop" if len(ids) < args.max_new_tokens else "length"
        records.append(record)
    if args.out is not None:
        write_jsonl(args.out, records)
        print(f"wrote {len(records)} answers to {args.out}")
        return 0
    for record in records:
        asked = record["input"] if "input" in record else record["messages"][-1]["content"]
        print(f"> {asked}\n{record['output']}\n")
    return 0
