"""The checks of a model's config.json that ModelConfig.from_hf runs before anything is built: sizes that
are positive and bounded, finite scalars, the head dimension, and the RoPE parameters it understands."""

from __future__ import annotations

from typing import Any

from fasttune.errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# Upper bounds on the fields that size the model, checked before anything is built (a config that asks for
# a billion layers would otherwise hang building them). Generous against the largest published models:
# Llama-3.1-405B has 126 layers, H 16384, I 53248, 128 heads; Qwen2.5-72B 80 layers, I 29568; vocabularies
# reach 256k (Gemma), context 10M (Llama 4 Scout); head dims are 64-256.
_SIZE_BOUNDS = {
    "vocab_size": 1 << 22,  # 4M tokens
    "hidden_size": 1 << 16,  # 65536
    "intermediate_size": 1 << 18,  # 262144
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "max_position_embeddings": 1 << 24,  # 16M
    "sliding_window": 1 << 24,
}


def _positive_int(v: Any, name: str, most: int, source: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{source}: field {name} must be a positive integer, got {v!r}")
    if v > most:
        raise ConfigError(f"{source}: field {name}={v} is above {most}, the most fasttune accepts")


def _finite(v: Any, name: str, source: str, low: float, high: float) -> None:
    """`low < v <= high`, a finite number; the bound is open below so that 0 (or theta 1) is refused."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not (low < v <= high):  # NaN fails here too
        raise ConfigError(f"{source}: field {name} must be a number in ({low:g}, {high:g}], got {v!r}")


def check_sizes(d: dict[str, Any], source: str) -> None:
    """Every field that sizes the model, or that the math divides by, within sane bounds (the file and the
    key named in the error)."""
    for k in _SIZE_BOUNDS:
        if (
            k == "sliding_window"
            and d.get("model_type") in ("qwen2", "qwen3")
            and not d.get("use_sliding_window")
        ):
            continue  # unused (from_hf drops it), whatever it says
        if d.get(k) is not None or k in REQUIRED:
            _positive_int(d.get(k), k, _SIZE_BOUNDS[k], source)
    n_q, n_kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
    if n_q % n_kv:
        raise ConfigError(
            f"{source}: field num_attention_heads={n_q} is not a multiple of num_key_value_heads={n_kv}"
        )
    # RMSNorm divides by sqrt(mean + eps); RoPE's frequencies are theta^(-2i/hd): both finite and positive.
    _finite(d.get("rms_norm_eps", 1e-6), "rms_norm_eps", source, 0.0, 1.0)
    if "rope_theta" in d:
        _finite(d["rope_theta"], "rope_theta", source, 1.0, 1e12)
    for key in ("rope_parameters", "rope_scaling"):
        params = d.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: field {key} must be an object, got {params!r}")
        if "rope_theta" in params:
            _finite(params["rope_theta"], f"{key}.rope_theta", source, 1.0, 1e12)
        if params.get("rope_type", params.get("type", "default")) != "default":
            _finite(params.get("factor", 1.0), f"{key}.factor", source, 0.0, 1024.0)
            original = params.get("original_max_position_embeddings")
            if original is not None:
                name = f"{key}.original_max_position_embeddings"
                _positive_int(original, name, _SIZE_BOUNDS["max_position_embeddings"], source)


def checked_head_dim(d: dict[str, Any], model_type: str, source: str) -> int:
    """Qwen3's config class defaults head_dim to 128; the others derive it from H / n_q, which must then
    divide. Rotary embeddings rotate pairs of channels, so it must be even."""
    if d.get("head_dim"):
        head_dim = d["head_dim"]
    elif model_type == "qwen3":
        head_dim = 128
    else:
        h, n_q = d["hidden_size"], d["num_attention_heads"]
        if h % n_q:
            raise ConfigError(
                f"{source}: field hidden_size={h} is not a multiple of num_attention_heads={n_q} "
                "(and no head_dim is given)"
            )
        head_dim = h // n_q
    if head_dim % 2:
        raise ConfigError(
            f"{source}: field head_dim={head_dim} must be even (rotary embeddings rotate pairs)"
        )
    return head_dim


def rope_parameters(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """RoPE theta and scaling, from either the transformers 4 layout (`rope_theta`, `rope_scaling`) or the
    transformers 5 one (`rope_parameters` with `rope_type` and `rope_theta` inside)."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
    return theta, params
