"""What the export tests share: small tokenizers and checkpoints of each family, and GGUF reading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttune.data import synth
from fasttune.models import builtin
from fasttune.models.tokenizer import Tokenizer
from helpers import hf_model

try:
    import gguf
except ImportError:  # an optional dependency: the GGUF tests skip, the hf/peft/merged ones still run
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed (pip install gguf)")
from fasttune.export.gguf import (  # noqa: E402
    _LLAMA3_REGEX,
    _QWEN2_REGEX,
    gguf_tensor_name,
    interleave_rope_rows,
)

T = gguf.GGMLQuantizationType if gguf is not None else None
IDS = torch.tensor([[3, 17, 42, 5, 99, 23, 8, 61, 7, 30, 2, 11]])

# Shapes for Q8_0: every weight row (the input dim) a multiple of Q8_0's block of 32. Head layouts kept
# from helpers' FAMILIES: GQA, an untied head, Qwen3's explicit head_dim (24, not H / n_q = 16).
Q8_SHAPES = {
    "qwen2_tied": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen2_untied": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1),
    "qwen3": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24
    ),
    "llama": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
}
FAMILIES = list(Q8_SHAPES)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def small_tokenizer(pre: str) -> Tokenizer:
    """A byte-level BPE of 400 tokens trained on the synthetic corpus, with ChatML's special tokens and the
    Qwen2.5 chat template, split by the pre-tokenizer of `pre`: "qwen2" or "llama-bpe" (their regexes),
    or "gpt-2" (fasttune's built-in BPE: a plain ByteLevel pre-tokenizer)."""
    texts = [r[k] for r in synth.generate(300, seed=1) for k in ("input", "output")]
    texts += ["12345 6789, it's"] * 200  # digits, so that the pre-tokenizers' digit rules show
    tok = builtin.train_tokenizer(texts, vocab_size=400)
    if pre == "gpt-2":
        return tok
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer(models.BPE())
    regex = {"qwen2": _QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX}[pre]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=builtin.SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk, tok.config, source=f"small {pre} BPE")


FAMILY_PRE = {"qwen2_tied": "gpt-2", "qwen2_untied": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}


def make_checkpoint(path, family: str, dtype=torch.float32, q8_shapes: bool = True, seed: int = 0, **config):
    """A random transformers checkpoint of `family` (config fields overridden by `config`) with a small
    tokenizer saved beside it; returns the fp32 transformers model and the tokenizer."""
    tok = small_tokenizer(FAMILY_PRE[family])
    overrides = dict(Q8_SHAPES[family]) if q8_shapes else {}
    model = hf_model(family, seed, vocab_size=tok.vocab_size, **{**overrides, **config})
    model.to(dtype).save_pretrained(path)
    tok.save(path)
    return model.float(), tok


def read_gguf(path):
    """{name: field contents} and {name: ReaderTensor}."""
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def expected_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> the fp32 source tensor as llama.cpp must receive it (Llama's q/k rows interleaved)."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach().float()
        if arch == "llama" and ".q_proj." in name:
            t = interleave_rope_rows(t, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            t = interleave_rope_rows(t, cfg.num_key_value_heads)
        out[gguf_tensor_name(name)] = t
    return out


def dequantized(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type)
