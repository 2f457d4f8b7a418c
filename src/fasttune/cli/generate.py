"""`fasttune generate`: answers from a model folder (or a LoRA adapter) to prompts given on the command line
or in a JSONL file, printed or written as JSONL.

    fasttune generate --model out/model "Tell me something about color." "And about rain?"
    fasttune generate --model out/adapter --file prompts.jsonl --out answers.jsonl --temperature 0.7 --seed 0

Each prompt is rendered with the tokenizer's chat template as a user message, with the generation prompt
(the assistant's turn opened), and `--system-prompt` as in `fasttune data`: `default` (the template's
own), `none`, or a text. `--raw` skips the template and encodes the text as it is (for base models).

`--file`: a JSONL file of prompts, as fasttune/eval/prompts.py says.

Output lines: the prompt's own field ("input" or "messages"), "output" (the generated text; the stop token
is not part of it), "reference" when the line had one, "new_tokens", and "finish_reason": "stop" (a stop
token ended it) or "length" (max-new-tokens did).
"""

from __future__ import annotations

from pathlib import Path

from fasttune.cli.options import add_device, add_dtype, add_sampling, add_system_prompt
from fasttune.errors import FasttuneError


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


def command(args) -> int:
    from fasttune.data.records import write_jsonl
    from fasttune.eval.generation import generate, load_for_generation
    from fasttune.eval.prompts import encode_prompt, read_prompt_file, stop_ids

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
        stop_token_ids=stop_ids(model, tokenizer),
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
