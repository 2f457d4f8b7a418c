"""GGUF files for llama.cpp and Ollama, written with the `gguf` package (an optional dependency).

    write_gguf(model, tokenizer, "model.gguf", quant="q8_0")

What goes in follows llama.cpp's own converter (`convert_hf_to_gguf.py`, its Qwen2, Qwen3 and Llama
classes), so that llama.cpp reads the file as it reads a converted Hugging Face checkpoint:

- Architecture: `qwen2`, `qwen3` or `llama`, with `<arch>.context_length`, `embedding_length`,
  `block_count`, `feed_forward_length`, `attention.head_count`, `attention.head_count_kv`,
  `attention.layer_norm_rms_epsilon`, `rope.freq_base`, linear RoPE scaling as `rope.scaling.type/factor`,
  and `attention.key_length/value_length` when config.json names a head_dim. Llama also gets
  `vocab_size` and `rope.dimension_count`, and Llama 3.1 RoPE scaling becomes a `rope_freqs` tensor of
  per-frequency divisors. `general.file_type` says the quantisation.
- Tensors, renamed as llama.cpp names them (`_TENSOR_NAMES`): `token_embd`, `blk.N.attn_q/k/v/output`
  (Qwen2's q/k/v biases too), `blk.N.ffn_gate/up/down`, `blk.N.attn_norm`, `blk.N.ffn_norm`,
  `output_norm`, and `output` only when the head is not tied to the embedding (llama.cpp then reuses
  `token_embd`).
- RoPE layout. Hugging Face checkpoints rotate dimension j of a head with j + hd/2 (`rotate_half`).
  llama.cpp's `qwen2`/`qwen3` architectures do the same (its NEOX rope), so their weights go in as they
  are; its `llama` architecture rotates adjacent pairs (2j, 2j+1), so the rows of q_proj and k_proj
  (and their biases) are reordered within each head, j -> 2j and j + hd/2 -> 2j + 1. q and k get the same
  permutation, so every q.k dot product, and hence the attention, is unchanged.
- Types, as the converter chooses them: 1-D tensors, norm weights and biases in F32; every other weight
  in the requested type (F32, F16, BF16 or Q8_0). Q8_0 works on blocks of 32 along a row, so a weight
  whose rows are not a multiple of 32 long falls back to F16, as the converter falls back.
- The tokenizer (byte-level BPE only): `tokenizer.ggml.model = gpt2`, `tokenizer.ggml.pre` (which
  pre-tokenizer regex llama.cpp must apply; see `_PRE_TOKENIZERS`), the token strings and types for
  every id below the model's vocab_size (ids the tokenizer does not define, the padding of an embedding
  rounded up, become `[PAD<id>]`, type UNUSED), the merges, the bos/eos/unk/sep/pad/mask ids, whether
  encoding adds bos/eos, and `tokenizer.chat_template`.

Tensors are converted and written one at a time (the header first, from shapes known in advance), so the
host memory above the model is one tensor, not a second copy of the model.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasttune.choices import GGUF_QUANTS as QUANTS
from fasttune.errors import ConfigError, FasttuneError, TokenizerError

log = logging.getLogger("fasttune")

GGUF_ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}  # config model_type -> GGUF arch
Q8_BLOCK = 32
_ENCODE_VALUES = 1 << 22  # values converted at a time (temporaries of ~50 MB)

# Per decoder layer: Hugging Face module path -> llama.cpp tensor name (both without .weight/.bias).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# The pre-tokenizer llama.cpp applies before BPE is chosen by name, each name standing for a regex built
# into llama.cpp. The converter identifies it by hashing the ids of a test string; here it is identified
# by the regex itself, which is what decides how text splits (and it works for a BPE trained on a new
# corpus, whose ids no hash table knows). The regexes are tokenizer.json's; llama.cpp's source quotes
# each as the original of its rewrite for that name.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}
# A plain ByteLevel pre-tokenizer with its own regex (GPT-2's; fasttune's built-in BPE) is llama.cpp's
# "gpt-2".
_BYTE_LEVEL_PRE = "gpt-2"

_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")  # GGUF has a key for each of these


def require_gguf():
    """The `gguf` module, or an error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise FasttuneError(
            "GGUF export needs the gguf package: pip install 'fasttune[gguf]' (or pip install gguf==0.19.0)"
        ) from None
    return gguf


# ----------------------------------------------------------------------------------------------------------
# What can be exported


def check_exportable(cfg, source: str = "config.json") -> str:
    """The GGUF architecture name for a ModelConfig, or a ConfigError saying what llama.cpp would get
    wrong."""
    arch = GGUF_ARCHS.get(cfg.model_type)
    if arch is None:
        raise ConfigError(
            f"{source}: GGUF export does not support model_type={cfg.model_type!r}; supported: "
            f"{', '.join(sorted(GGUF_ARCHS))}"
        )
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        raise ConfigError(
            f"{source}: sliding_window={cfg.sliding_window}: llama.cpp's {arch} architecture attends over "
            "the whole context, so the GGUF would compute something else past the window"
        )
    scaling = cfg.rope_scaling
    if scaling is not None and scaling["rope_type"] == "llama3" and arch != "llama":
        raise ConfigError(
            f"{source}: rope type 'llama3' with model_type={cfg.model_type!r}: llama.cpp's {arch} "
            "architecture has no per-frequency RoPE factors"
        )
    if arch != "llama" and (cfg.o_bias or cfg.mlp_bias):
        raise ConfigError(
            f"{source}: attention_bias/mlp_bias on {cfg.model_type}: llama.cpp's {arch} architecture has "
            "no o_proj or MLP biases"
        )
    return arch


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a fasttune / Hugging Face parameter name."""
    module, _, leaf = hf_name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{leaf}"
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3:
        inner = ".".join(parts[3:])
        if inner in _LAYER_NAMES:
            return f"blk.{int(parts[2])}.{_LAYER_NAMES[inner]}.{leaf}"
    raise ConfigError(f"GGUF export: no llama.cpp name for parameter {hf_name!r}")


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of q_proj/k_proj (weight [n*hd, H] or bias [n*hd]) within each head from the
    half-split RoPE layout (pairs j, j + hd/2) to the interleaved one (pairs 2j, 2j + 1)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg) -> torch.Tensor:
    """Llama 3.1 RoPE scaling as llama.cpp takes it: a divisor per frequency (`rope_freqs`, [hd/2] F32),
    so that the scaled inverse frequency is theta^(-2i/hd) / factor_i. Long wavelengths are divided by
    `factor`, short ones kept, the band between them interpolated."""
    s = cfg.rope_scaling
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    out = []
    for f in inv_freq.tolist():
        wavelen = 2 * np.pi / f
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:  # the interpolated band: 1 / ((1 - smooth) / factor + smooth)
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Tensors


@dataclass
class PlannedTensor:
    name: str  # llama.cpp's
    source: str  # fasttune's parameter name, or "" for a generated tensor
    shape: tuple[int, ...]  # PyTorch order ([out, in]); GGUF stores the dims reversed
    qtype: Any  # gguf.GGMLQuantizationType
    value: Any  # () -> fp32 torch tensor, already permuted where needed


def tensor_type(gguf, name: str, shape: tuple[int, ...], quant: str):
    """The GGML type of one tensor, by the converter's rules (see the module docstring)."""
    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32
    wanted = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[quant]
    if wanted == T.Q8_0 and shape[-1] % Q8_BLOCK:
        log.info("%s: rows of %d are not a multiple of %d: F16 instead of Q8_0", name, shape[-1], Q8_BLOCK)
        return T.F16
    return wanted


def plan_tensors(model, quant: str, gguf) -> list[PlannedTensor]:
    """Every tensor of the GGUF file, in writing order, with its type; nothing converted yet."""
    cfg = model.config
    arch = check_exportable(cfg, model.info.source_path or "model")
    state = {n: t.detach() for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:  # llama.cpp uses token_embd for the head when `output` is absent
        state.pop("lm_head.weight", None)
    planned = []

    def add(name, source, shape, value):
        planned.append(
            PlannedTensor(name, source, tuple(shape), tensor_type(gguf, name, shape, quant), value)
        )

    if arch == "llama" and cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(cfg)
        add("rope_freqs.weight", "", factors.shape, lambda: factors)
    for hf_name, t in state.items():
        if hf_name.endswith(("lora_A.weight", "lora_B.weight")) or ".base_layer." in hf_name:
            raise ConfigError(f"GGUF export: {hf_name}: merge the LoRA adapters first (merge_lora)")
        heads = None
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads

        def value(t=t, heads=heads):
            x = t.to(device="cpu")
            return interleave_rope_rows(x, heads) if heads else x

        add(gguf_tensor_name(hf_name), hf_name, t.shape, value)
    return planned


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 1
    return n // block * size


def _encode(gguf, x: torch.Tensor, qtype) -> np.ndarray:
    """A tensor (any float dtype) -> the bytes GGUF stores for `qtype`, by gguf's own conversions (BF16
    rounds fp32 to nearest even; Q8_0 is bit-exact with ggml's reference quantiser). Rows are converted
    a slice at a time into the output: the package's BF16 path holds 12 bytes per value in temporaries,
    which for a whole embedding (136M values in Qwen2.5-0.5B) would be 1.6 GB above the model."""
    if x.dim() < 2:
        return gguf.quants.quantize(x.float().numpy(), qtype)
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, _ENCODE_VALUES // rows.shape[1])
    first = gguf.quants.quantize(rows[:step].float().contiguous().numpy(), qtype)
    out = np.empty((rows.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:step] = first
    for i in range(step, rows.shape[0], step):
        out[i : i + step] = gguf.quants.quantize(rows[i : i + step].float().contiguous().numpy(), qtype)
    return out.reshape(*x.shape[:-1], *out.shape[1:])


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class GGUFVocab:
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _looks_special(text: str) -> bool:
    """Added tokens written like control tokens are control tokens even when not flagged special (the
    converter's rule: <|...|>, <｜...｜>, <pad>, <mask>, <unusedN>...)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def pre_tokenizer_name(pre: dict | None, source: str) -> str:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer`, or a TokenizerError."""
    if pre is None:
        raise TokenizerError(
            f"{source}: tokenizer.json has no pre_tokenizer; GGUF export needs byte-level BPE"
        )
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
            return _BYTE_LEVEL_PRE
    elif pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert", False)
            and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space", False)
        ):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex in _PRE_TOKENIZERS:
                return _PRE_TOKENIZERS[regex]
    raise TokenizerError(
        f"{source}: tokenizer.json's pre_tokenizer is not one llama.cpp reproduces here (supported: the "
        f"Qwen2 and Llama 3 regex splits, or GPT-2's ByteLevel); got {json.dumps(pre)[:300]}"
    )


def _merges(model: dict, source: str) -> list[str]:
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):
        # tokenizers >= 0.20 writes pairs, which may hold spaces; GGUF keeps "left right" strings, with a
        # space inside a part written as U+0120 ('Ġ', byte-level BPE's own spelling of a space).
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    if merges and not isinstance(merges[0], str):
        raise TokenizerError(f"{source}: tokenizer.json has merges in an unknown format")
    return list(merges)


def build_vocab(tokenizer, vocab_size: int, model_hf: dict) -> GGUFVocab:
    """The tokenizer as llama.cpp's `gpt2` vocabulary of `vocab_size` entries (the model's, which may be
    larger than the tokenizer's)."""
    source = tokenizer.source
    tk = tokenizer.tk
    data = json.loads(tk.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"{source}: tokenizer model type {model.get('type')!r}: GGUF export writes byte-level BPE "
            "tokenizers (Qwen2/Qwen3, Llama 3)"
        )
    pre = pre_tokenizer_name(data.get("pre_tokenizer"), source)
    vocab = tk.get_vocab(with_added_tokens=True)
    top = max(vocab.values())
    if top >= vocab_size:
        raise TokenizerError(
            f"{source}: the tokenizer has ids up to {top} but the model's vocab_size is {vocab_size}: "
            "those tokens have no embedding"
        )
    added = tk.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    T_NORMAL, T_CONTROL, T_USER, T_UNUSED = 1, 3, 4, 5  # gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(T_UNUSED)
        elif i in added:
            token = added[i]
            if not token.normalized:  # llama.cpp takes added tokens as already normalised: make them so
                text = tk.decode(tk.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if token.special or _looks_special(text):
                types.append(T_CONTROL)
            else:
                text = text.replace("\u2581", " ")  # a SentencePiece space in a user-defined token
                types.append(T_USER)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(T_NORMAL)

    special_ids: dict[str, int] = {}
    for typ in _SPECIAL_TYPES:  # tokenizer_config.json first, then config.json, as the converter reads
        text = tokenizer.special_tokens.get(f"{typ}_token")
        tid = next((i for i, a in added.items() if a.content == text), None) if text else None
        if tid is None:
            tid = model_hf.get(f"{typ}_token_id")
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < vocab_size:
            special_ids[typ] = tid

    # Whether encoding adds bos/eos: tokenizer_config.json's flag when it has one, else what the
    # tokenizer's post-processor does to a plain string.
    probe = tk.encode("a", add_special_tokens=True).ids
    plain = tk.encode("a", add_special_tokens=False).ids
    adds_first = len(probe) > len(plain) and probe[0] == special_ids.get("bos", -1)
    adds_last = len(probe) > len(plain) and probe[-1] == special_ids.get("eos", -1)
    cfg = tokenizer.config
    add_bos = cfg["add_bos_token"] if isinstance(cfg.get("add_bos_token"), bool) else adds_first
    add_eos = cfg["add_eos_token"] if isinstance(cfg.get("add_eos_token"), bool) else adds_last
    return GGUFVocab(
        pre, tokens, types, _merges(model, source), special_ids, add_bos, add_eos, tokenizer.chat_template
    )


# ----------------------------------------------------------------------------------------------------------
# Writing


def _file_type(gguf, quant: str):
    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[quant]


def _add_architecture(w, gguf, cfg, arch: str, quant: str) -> None:
    hf = cfg.hf
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    # llama.cpp derives the head size as embedding_length / head_count unless told: tell it whenever
    # config.json names one (as the converter does) or it differs from that.
    if hf.get("head_dim") is not None or cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
    w.add_file_type(_file_type(gguf, quant))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(w, v: GGUFVocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    if v.merges:
        w.add_token_merges(v.merges)
    for typ, tid in v.special_ids.items():
        getattr(w, f"add_{typ}_token_id")(tid)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def write_gguf(
    model, tokenizer, path: str | os.PathLike, quant: str = "bf16", name: str | None = None
) -> Path:
    """Write `model` (a fasttune CausalLM without unmerged adapters) and `tokenizer` as one GGUF file.

    quant: "bf16" (default), "f16", "f32" or "q8_0"; 1-D tensors and norms stay F32 whatever it is.
    The file is written under a temporary name beside `path` and renamed when complete.
    """
    gguf = require_gguf()
    if quant not in QUANTS:
        raise ConfigError(f"GGUF quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if tokenizer is None:
        raise TokenizerError("GGUF export needs the tokenizer (a folder with tokenizer.json)")
    cfg = model.config
    arch = check_exportable(cfg, model.info.source_path or "model")
    vocab = build_vocab(tokenizer, cfg.vocab_size, cfg.hf)
    planned = plan_tensors(model, quant, gguf)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or Path(model.info.source_path or path.stem).name)
    _add_architecture(w, gguf, cfg, arch, quant)
    _add_vocab(w, vocab)
    for t in planned:
        # Only shapes and byte counts here: the header goes out before any tensor is converted.
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(gguf, t.shape, t.qtype), t.qtype)

    # A fresh name that the writer creates itself, so the file gets the usual permissions (umask).
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in planned:
            data = _encode(gguf, t.value(), t.qtype)
            w.write_tensor_data(data)
            del data
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s (%s, %s, %d tensors)", path, arch, quant, len(planned))
    return path
