"""Evaluating a model on a prepared split: loss and perplexity, generations and what they say.

    split_loss(model, data, micro_batch_tokens, device, autocast_dtype) -> {"loss", "perplexity", ...}
    generation_metrics(generations, token_counts, train_outputs, families, train_families) -> dict
    evaluate_run(model, tokenizer, data_dir, split="test", max_examples=None, ...) -> report (dict)
    write_report(report, path)                      # JSON, through a temporary file and a rename

`fasttune eval` (cli/eval.py) runs these from the command line and adds the LLM judge (judge.py).

The split. `data_dir` is what `fasttune data prepare` (corpus.prepare) writes, `OUT/data` of a run:
`<split>.jsonl` (the records as read) and `tokenized/<split>/` (token ids, trained-token mask, offsets,
`index[i]` = the record's line among the file's records). When the tokenizer given is not the one the
split was tokenized with (another model in a comparison), the records are tokenized again with the same
options, in memory.

Loss: the mean cross-entropy over every trained token of the split (packed best-fit-decreasing into rows
of `micro_batch_tokens`, no padding), token-weighted across rows, as the training loop's validation;
perplexity is exp(loss), with the loss capped at 50 as the loop does. `max_examples` limits the
generations only: the loss is always over the whole split (one forward pass, cheap next to generating).

Prompts: each example's tokens before its last response, i.e. before the start of the last run of trained
tokens (for one-turn data, the first trained token, as `fasttune run` prints its samples); with
`train_on_input` every token is trained, so the conversation without its last message is rendered with
the generation prompt instead. The first `max_examples` examples of the split are generated, in order.

Generation metrics (texts are the decoded new tokens, stop token excluded, stripped):
  distinct_1, distinct_2  distinct word n-grams / all word n-grams over all generations, n-grams taken
                          within each text after `text_stats.normalize_text` (`text_stats.distinct_n`);
  mean_tokens, mean_words generated tokens per example; whitespace-separated words per generation;
  empty                   generations with no word;
  memorised               the share of generations equal to some training output (the training
                          records' last assistant message) after `text_stats.normalize_text`: casefolded,
                          Unicode punctuation dropped, whitespace collapsed;
  template_coverage       for records with `meta_template` (the synthetic corpus's seven shapes, or any
                          corpus's own labels), see `template_coverage`. None when the split has none.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fasttune.data.packing import (
    TokenizedData,
    TokenizeOptions,
    collate,
    pack_bfd,
    tokenize,
    tokenizer_fingerprint,
    with_system_prompt,
)
from fasttune.data.records import DataError, Example, detect_format, to_messages
from fasttune.data.text_stats import distinct_n, normalize_text
from fasttune.errors import FasttuneError
from fasttune.eval.generation import generate
from fasttune.io.atomic import write_atomic
from fasttune.io.jsonl import LineError, parse_json, read_lines
from fasttune.models.model import CausalLM
from fasttune.models.tokenizer import Tokenizer

FAMILY_KEY = "meta_template"
START = "^"  # marks a text's first word in family n-grams: how a saying opens tells its shape best
LOSS_CAP = 50.0  # exp(50) ~ 5e21: past this, perplexity says nothing more (and JSON has no inf)


# ----------------------------------------------------------------------------------------------------------
# Metrics on texts


def memorised(generations: Sequence[str], train_outputs: Sequence[str]) -> list[bool]:
    """Per generation: equal to some training output after `normalize_text` (an empty one never is)."""
    seen = {normalize_text(t) for t in train_outputs}
    seen.discard("")
    return [normalize_text(g) in seen for g in generations]


def _grams(text: str, n: int) -> set[tuple[str, ...]]:
    words = [START, *normalize_text(text).split()]
    if len(words) == 1:  # no word at all: not even the opening marker says anything
        return set()
    return set(zip(*(words[i:] for i in range(n)), strict=False))


def distinctive_ngrams(outputs: Sequence[str], families: Sequence[str], n: int = 2) -> dict[str, set]:
    """Per family, the word n-grams (a START marker before the first word) that occur in the outputs
    of that family and of no other."""
    grams: dict[str, set] = {}
    for text, family in zip(outputs, families, strict=True):
        grams.setdefault(family, set()).update(_grams(text, n))
    count = Counter(g for s in grams.values() for g in s)
    return {f: {g for g in s if count[g] == 1} for f, s in grams.items()}


def classify_family(text: str, distinctive: dict[str, set], n: int = 2) -> str | None:
    """The family whose distinctive n-grams the text contains most; None if it contains none, or if two
    families tie for the most."""
    grams = _grams(text, n)
    hits = {f: len(grams & d) for f, d in distinctive.items()}
    best = max(hits.values(), default=0)
    winners = [f for f, h in hits.items() if h == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def template_coverage(
    generations: Sequence[str],
    families: Sequence[str],
    train_outputs: Sequence[str],
    train_families: Sequence[str],
    n: int = 2,
) -> dict:
    """Which template families the generations cover.

    Each generation is assigned a family by `classify_family`, from the word n-grams (n = 2, the first
    word marked) that are distinctive of one family in the training outputs: "Better a ..." openings
    are better_than's, "he who" he_who's. `families[i]` is the family of the record that prompt i came
    from. Returns
      families    per family of the prompts: prompts (how many), nonempty (generations with a word),
                  generated (generations of any prompt assigned this family), own (generations for
                  this family's prompts assigned this family);
      coverage    the share of the prompts' families that at least one generation is assigned to: 1.0
                  when the model still writes every shape, 1/7 when it collapsed into one;
      agreement   the share of generations assigned their own prompt's family (a prompt that does not
                  ask for a shape, e.g. "Tell me a proverb", may rightly get another);
      unassigned  generations assigned no family (no distinctive n-gram, or a tie).
    """
    distinctive = distinctive_ngrams(train_outputs, train_families, n)
    assigned = [classify_family(g, distinctive, n) for g in generations]
    generated = Counter(a for a in assigned if a is not None)
    per: dict[str, dict] = {}
    for g, f, a in zip(generations, families, assigned, strict=True):
        row = per.setdefault(f, {"prompts": 0, "nonempty": 0, "generated": 0, "own": 0})
        row["prompts"] += 1
        row["nonempty"] += bool(g.split())
        row["own"] += a == f
    for f, row in per.items():
        row["generated"] = generated[f]
    covered = sum(generated[f] > 0 for f in per)
    return {
        "families": dict(sorted(per.items())),
        "coverage": covered / len(per) if per else None,
        "covered": covered,
        "agreement": sum(r["own"] for r in per.values()) / len(generations) if generations else None,
        "unassigned": sum(a is None for a in assigned),
        "generated_outside": {f: c for f, c in sorted(generated.items()) if f not in per},
    }


def generation_metrics(
    generations: Sequence[str],
    token_counts: Sequence[int],
    train_outputs: Sequence[str],
    families: Sequence[str | None] | None = None,
    train_families: Sequence[str | None] | None = None,
) -> dict:
    """The generation metrics of the module docstring. `families[i]` is the meta_template of prompt i's
    record (None where it has none); `train_families` the same for `train_outputs`."""
    n = len(generations)
    mem = memorised(generations, train_outputs)
    out = {
        "examples": n,
        "distinct_1": distinct_n(generations, 1),
        "distinct_2": distinct_n(generations, 2),
        "mean_tokens": sum(token_counts) / n if n else None,
        "mean_words": sum(len(g.split()) for g in generations) / n if n else None,
        "empty": sum(not g.split() for g in generations),
        "memorised": sum(mem) / n if n else None,
        "memorised_count": sum(mem),
        "template_coverage": None,
    }
    if families is not None and any(f is not None for f in families):
        keep = [i for i, f in enumerate(families) if f is not None]
        train = [
            (t, f) for t, f in zip(train_outputs, train_families or [None] * len(train_outputs), strict=True)
        ]
        train = [(t, f) for t, f in train if f is not None]
        out["template_coverage"] = template_coverage(
            [generations[i] for i in keep],
            [families[i] for i in keep],
            [t for t, _ in train],
            [f for _, f in train],
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Loss and perplexity


@torch.no_grad()
def loss_over_bins(
    model: CausalLM,
    data: TokenizedData,
    bins: list[list[int]],
    device: torch.device,
    cast=None,
    rank: int = 0,
    world: int = 1,
    pad_to: int | None = None,
) -> tuple[float, int]:
    """(summed cross-entropy, target count) over this rank's share of `bins`: every `world`-th bin from
    `rank`. A rank short of bins runs its first one again with weight 0, since under FSDP every rank must
    join every forward. `cast`: the context the forward runs in (autocast), none by default. The one loss
    of a split: the run's validation and test loss and `fasttune eval` all come from here."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for first in range(0, len(bins), world):
            j = first + rank
            b = collate(data, bins[j if j < len(bins) else rank % len(bins)], pad_to=pad_to).to(device)
            with cast if cast is not None else contextlib.nullcontext():
                loss = model.loss(b.input_ids, b.targets, b.position_ids, b.cu_seqlens, b.max_seqlen)
            if j < len(bins):
                total += float(loss.float()) * b.num_targets  # float64 on the host: no drift over many rows
                count += b.num_targets
    finally:
        model.train(was_training)
    return total, count


def split_loss(
    model: CausalLM,
    data: TokenizedData,
    micro_batch_tokens: int = 16384,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """{"loss", "perplexity", "targets", "examples"}: the mean cross-entropy over every trained token of
    `data` (loss and perplexity None for an empty split). `autocast_dtype` (e.g. torch.bfloat16) runs
    the forward under autocast, as a bf16 training run does; None runs in the model's dtype."""
    if len(data) == 0:
        return {"loss": None, "perplexity": None, "targets": 0, "examples": 0}
    device = torch.device(device) if device is not None else model.lm_head.weight.device
    budget = max(micro_batch_tokens, int(data.lengths.max()))
    cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    total, count = loss_over_bins(model, data, pack_bfd(data.lengths, budget), device, cast)
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, LOSS_CAP)),
        "targets": count,
        "examples": len(data),
    }


# ----------------------------------------------------------------------------------------------------------
# The split's records, tokens and prompts


def read_records(path: str | os.PathLike) -> list[Example]:
    """The records of a split file, each in its own detected format (a split may mix sources)."""
    path = Path(path)
    hint = " (a folder from `fasttune data prepare`?)"
    out = []
    # No line limit: prepare wrote this file, from lines that passed its limit for the run's max_seq_len.
    for line in read_lines(path, "split file", hint=hint):
        if not line.text.strip() and not line.problem:
            continue
        try:
            if line.problem:
                raise LineError(line.problem)
            record = parse_json(line.text)
            messages, meta = to_messages(record, detect_format(record) or "io")
        except Exception as e:  # the file was validated by prepare: anything here means it was edited
            raise DataError(f"{path}:{line.number}: not a valid record ({e})") from None
        out.append(Example(messages, meta, str(path), line.number, line.text))
    return out


def load_split(
    data_dir: str | os.PathLike, split: str, tokenizer: Tokenizer
) -> tuple[TokenizedData, list[Example]]:
    """The tokenized split for `tokenizer` and the split's records (`data.index[i]` is example i's)."""
    data_dir = Path(data_dir)
    records = read_records(data_dir / f"{split}.jsonl")
    data = TokenizedData.load(data_dir / "tokenized" / split)
    if data.meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        opts = TokenizeOptions(**data.meta.get("options", {}))
        data, _ = tokenize(records, tokenizer, opts)
    elif len(records) <= int(np.max(data.index, initial=-1)):
        raise DataError(
            f"{data_dir / split}.jsonl has {len(records)} records but {data_dir}/tokenized/{split} refers to "
            f"record {int(np.max(data.index)) + 1}: the two do not belong together"
        )
    return data, records


def prompt_ids(data: TokenizedData, i: int, record: Example, tokenizer: Tokenizer) -> list[int]:
    """Example i's tokens before its last response (see the module docstring)."""
    ids, mask = data.sequence(i)
    mask = np.asarray(mask, dtype=bool)
    opts = data.meta.get("options", {})
    if not opts.get("train_on_input", False):
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        if len(starts) and starts[-1] > 0:
            return [int(t) for t in ids[: starts[-1]]]
    messages = with_system_prompt(record.messages[:-1], opts.get("system_prompt", "default"), tokenizer)
    return tokenizer.encode_chat(messages, add_generation_prompt=True).ids


def instruction_text(messages: list[dict]) -> str:
    """What was asked, for a report or a judge: the user's message, or for several turns each one as a
    "User: ..." / "Assistant: ..." line. A system message is left out."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def _family(example: Example) -> str | None:
    value = example.meta.get(FAMILY_KEY)
    return None if value is None else str(value)


# ----------------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_run(
    model: CausalLM,
    tokenizer: Tokenizer,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    micro_batch_tokens: int = 16384,
    autocast_dtype: torch.dtype | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = 0,
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    loss: float | None = None,
) -> dict:
    """Loss and perplexity on `split` of `data_dir`, generations for its first `max_examples` prompts
    (None: all) and their metrics; the report, also written to `out` (JSON) when given. `loss`: the
    split's mean loss when the caller has just measured it (the end of a run), so it is not computed
    twice."""
    if max_examples is not None and max_examples < 0:
        raise FasttuneError(f"max_examples must be >= 0, got {max_examples}")
    data_dir = Path(data_dir)
    data, records = load_split(data_dir, split, tokenizer)
    report = {
        "split": split,
        "data": str(data_dir),
        "model": model.info.source_path,
        **(
            split_loss(model, data, micro_batch_tokens, autocast_dtype=autocast_dtype)
            if loss is None
            else {
                "loss": loss,
                "perplexity": math.exp(min(loss, LOSS_CAP)),
                "targets": sum(int(data.sequence(i)[1][1:].sum()) for i in range(len(data))),
                "examples": len(data),
            }
        ),
    }
    chosen = range(len(data) if max_examples is None else min(max_examples, len(data)))
    examples = [records[int(data.index[i])] for i in chosen]
    prompts = [prompt_ids(data, i, e, tokenizer) for i, e in zip(chosen, examples, strict=True)]
    settings = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    new = generate(model, prompts, stop_token_ids=tokenizer.stop_token_ids, batch_size=batch_size, **settings)
    texts = [tokenizer.decode(ids).strip() for ids in new]
    train = read_records(data_dir / "train.jsonl")
    train_outputs = [e.response for e in train]
    families = [_family(e) for e in examples]
    report["generation"] = settings
    report["metrics"] = generation_metrics(
        texts, [len(ids) for ids in new], train_outputs, families, [_family(e) for e in train]
    )
    mem = memorised(texts, train_outputs)
    report["generations"] = [
        {
            "index": int(data.index[i]),
            "instruction": instruction_text(e.messages[:-1]),
            "reference": e.response,
            "generation": text,
            "tokens": len(ids),
            FAMILY_KEY: f,
            "memorised": m,
        }
        for i, e, text, ids, f, m in zip(chosen, examples, texts, new, families, mem, strict=True)
    ]
    if out is not None:
        write_report(report, out)
    return report


def _finite(value):
    """JSON has no NaN or infinity: such a float becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """The report as indented JSON, written beside `path` and renamed into place."""
    path = Path(path)
    write_atomic(path, json.dumps(_finite(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return path


__all__ = [
    "classify_family",
    "distinctive_ngrams",
    "evaluate_run",
    "generation_metrics",
    "instruction_text",
    "load_split",
    "memorised",
    "prompt_ids",
    "read_records",
    "loss_over_bins",
    "split_loss",
    "template_coverage",
    "write_report",
]
