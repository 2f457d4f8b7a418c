"""A corpus from files to training-ready splits (`prepare`), and what is in it (`inspect`).

prepare: read and validate -> deduplicate -> grouped, stratified split -> write each split's records as
read (train.jsonl, val.jsonl, test.jsonl) -> tokenize with the chat template -> save memory-mapped arrays
(tokenized/<split>/) -> measure packing -> prepare.json with every count. Whatever is left out (bad lines
under skip_bad, examples over max_seq_len) goes to rejects.jsonl with its reason.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fasttune.data.packing import (
    TokenizeOptions,
    pack_bfd,
    packing_efficiency,
    padded_efficiency,
    tokenize,
    with_system_prompt,
)
from fasttune.data.records import (
    SPLITS,
    DataError,
    Source,
    dedup,
    group_counts,
    read_sources,
    split,
    write_jsonl,
    write_rejects,
)
from fasttune.data.text_stats import distinct_n
from fasttune.models.tokenizer import Tokenizer, format_mask


@dataclass
class PrepareOptions:
    ratios: tuple[float, float, float] = (0.9, 0.05, 0.05)
    seed: int = 0
    stratify_key: str | None = "meta_template"
    skip_bad: bool = False
    budget: int = 16384  # tokens per packed micro-batch, for the packing report
    tokenize: TokenizeOptions = field(default_factory=TokenizeOptions)


def prepare(
    sources: list[Source | str],
    out: str | os.PathLike,
    tokenizer: Tokenizer,
    opts: PrepareOptions | None = None,
) -> dict:
    """Prepare `sources` into `out`; returns (and writes to out/prepare.json) the report."""
    opts = opts or PrepareOptions()
    out = Path(out)
    t0 = time.perf_counter()
    examples, rejected = read_sources(sources, opts.skip_bad, opts.tokenize.max_seq_len)
    kept, dstats = dedup(examples)
    splits = split(kept, opts.ratios, opts.seed, opts.stratify_key)
    result = {
        "files": [str(s if isinstance(s, str | os.PathLike) else s.path) for s in sources],
        "examples_read": len(examples),
        "rejected_lines": len(rejected),
        "dedup": asdict(dstats),
        "splits": {},
    }
    tokenized, dropped = {}, []
    for name in SPLITS:
        data, problems = tokenize(splits[name], tokenizer, opts.tokenize)
        fatal = [p for p in problems if "no trainable token" in p.reason]
        if fatal and not opts.skip_bad:
            raise DataError("\n".join(str(p) for p in fatal), fatal)
        dropped += problems
        tokenized[name] = data
        result["splits"][name] = {
            "examples": len(data),
            "tokens": data.num_tokens,
            "targets": data.meta["num_targets"],
            "dropped": len(problems),
        }
    if not any(len(tokenized[name]) for name in SPLITS):
        # read_sources left at least one example per file, so every one of them is in `dropped`.
        more = f" (and {len(dropped) - 1} more like it)" if len(dropped) > 1 else ""
        raise DataError(
            f"no usable examples in {', '.join(result['files'])}: all {len(kept)} were dropped when "
            f"tokenized, the first as {dropped[0]}{more}",
            dropped,
        )
    rejected += dropped
    # Everything checked: only now write, each file through a temporary name.
    for name in SPLITS:
        dropped_lines = set(range(len(splits[name]))) - set(tokenized[name].index.tolist())
        write_jsonl(
            out / f"{name}.jsonl", [e.raw for i, e in enumerate(splits[name]) if i not in dropped_lines]
        )
        # The saved arrays index the written file, which no longer has the dropped lines.
        tokenized[name].index = np.arange(len(tokenized[name]), dtype=np.int64)
        tokenized[name].save(out / "tokenized" / name)
    if rejected:
        write_rejects(out / "rejects.jsonl", rejected)
    elif (out / "rejects.jsonl").exists():
        (out / "rejects.jsonl").unlink()

    lengths = tokenized["train"].lengths
    bins = pack_bfd(lengths, opts.budget, seed=opts.seed) if len(lengths) else []
    result["packing"] = {
        "budget": opts.budget,
        "micro_batches": len(bins),
        "efficiency": round(packing_efficiency(lengths, bins, opts.budget), 4),
        "padded_32_efficiency": round(padded_efficiency(lengths, 32, opts.seed), 4),
    }
    result["tokenizer"] = tokenized["train"].meta["tokenizer"]
    result["options"] = asdict(opts)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "prepare.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _percentiles(values: np.ndarray) -> str:
    if len(values) == 0:
        return "none"
    p = np.percentile(values, [50, 90, 99]).round().astype(int)
    return f"p50 {p[0]}, p90 {p[1]}, p99 {p[2]}, max {int(values.max())}, mean {values.mean():.1f}"


def inspect(
    sources: list[Source | str],
    tokenizer: Tokenizer,
    opts: TokenizeOptions | None = None,
    max_seq_len: int | None = None,
) -> str:
    """A readable report of what the files hold (raises DataError with the report of bad lines).
    `max_seq_len` sets the line length limit of the reader (see fasttune.io.jsonl); opts measures, uncut."""
    opts = opts or TokenizeOptions(too_long="truncate", max_seq_len=1 << 30)
    examples, _ = read_sources(sources, max_seq_len=max_seq_len or TokenizeOptions().max_seq_len)
    kept, d = dedup(examples)
    n = len(examples)
    lines = [f"{n} examples in {len(sources)} file(s)"]
    lines.append(
        f"duplicates: {d.exact} exact, {d.normalized} after normalisation "
        f"({(d.exact + d.normalized) / max(n, 1):.2%} of examples); "
        f"{d.near_duplicate_responses} distinct responses are one word away from another"
    )
    for key, title in (("meta_template", "template family"), ("meta_input_type", "input type")):
        counts = group_counts(examples, key)
        if set(counts) == {"(none)"}:
            continue
        lines.append(f"per {title} ({key}):")
        for value, c in sorted(counts.items()):
            flag = "  <- under 10%" if key == "meta_template" and c / n < 0.10 else ""
            lines.append(f"  {value:24s} {c:7d}  {c / n:6.1%}{flag}")
    data, _ = tokenize(kept, tokenizer, opts)
    responses = np.array(
        [int(data.mask[s:e].sum()) for s, e in zip(data.offsets[:-1], data.offsets[1:], strict=True)]
    )
    lines.append(
        f"tokens per example ({tokenizer.source}, system prompt: {opts.system_prompt}): "
        f"{_percentiles(data.lengths)}"
    )
    lines.append(f"trained tokens per example: {_percentiles(responses)}")
    texts = [e.response for e in kept]
    lines.append(f"responses: distinct-1 {distinct_n(texts, 1):.3f}, distinct-2 {distinct_n(texts, 2):.3f}")
    if kept:
        enc = tokenizer.encode_chat(with_system_prompt(kept[0].messages, opts.system_prompt, tokenizer))
        lines.append(
            f"first example ({kept[0].file}:{kept[0].line}), {len(enc.ids)} tokens, "
            f"trained tokens in [[...]]:"
        )
        lines.append("  " + format_mask(tokenizer, enc).replace("\n", "\n  "))
    return "\n".join(lines)
