"""What the benchmark trains: a checkpoint and tokenized examples.

- `tiny_workload`: the built-in tiny Qwen2 (the default model's shape) with a BPE trained on the
  built-in corpus, and that corpus tokenized: small enough for the CPU (the CI gate, `--model tiny`).
- `random_checkpoint`: random weights of a named shape (the planner's table, so that `fasttune plan` and
  `fasttune bench` mean the same model by the same name), with the bundled Qwen2.5 tokenizer.
- `tokenized`: a JSONL file or the built-in corpus, with a model folder's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fasttune.bench.runners import MAX_LEN, StepPlan
from fasttune.data.packing import TokenizedData, TokenizeOptions, tokenize
from fasttune.data.records import Example
from fasttune.plan.tables import SHAPES

BUILTIN_CORPUS = 36079  # examples of the built-in corpus a named shape or a model folder trains on


def _chat(records: list[dict]) -> list[Example]:
    return [
        Example([{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}])
        for r in records
    ]


def tiny_workload(
    root: Path, n_examples: int = 1200, tokens: int = 40_000, seed: int = 0
) -> tuple[Path, TokenizedData, StepPlan]:
    """The tiny checkpoint (written to `root/model`), its tokenized corpus and a step plan of `tokens`."""
    from fasttune.data import synth
    from fasttune.models import builtin
    from fasttune.models.weights import save_model

    records = synth.generate(n_examples, seed)
    tok = builtin.train_tokenizer([r[k] for r in records for k in ("input", "output")])
    torch.manual_seed(seed)
    model = builtin.tiny_model(tok, seed)
    save_model(model, root / "model", tokenizer=tok)
    options = TokenizeOptions(max_seq_len=MAX_LEN, too_long="truncate", system_prompt="none")
    data, _ = tokenize(_chat(records), tok, options)
    return root / "model", data, StepPlan.make(data, tokens, seed)


def random_checkpoint(shape: str, folder: Path, dtype: torch.dtype) -> Path:
    """Random weights of a named shape, with the bundled Qwen2.5 tokenizer, written by transformers."""
    import transformers

    from fasttune.models.tokenizer import write_builtin_tokenizer

    spec = {"max_position_embeddings": 32768, **SHAPES[shape]}
    cfg = transformers.AutoConfig.for_model(**spec)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    write_builtin_tokenizer(folder)
    return folder


def tokenized(model_dir: Path, data_file: str | None, seed: int) -> TokenizedData:
    """`data_file` (JSONL) or the built-in corpus, tokenized with the tokenizer in `model_dir`."""
    from fasttune.data import synth
    from fasttune.data.records import read_sources
    from fasttune.models.tokenizer import load_tokenizer

    if data_file:
        examples, _ = read_sources([data_file])
    else:
        examples = _chat(synth.generate(BUILTIN_CORPUS, seed))
    options = TokenizeOptions(max_seq_len=MAX_LEN, too_long="truncate")
    data, _ = tokenize(examples, load_tokenizer(model_dir), options)
    return data
