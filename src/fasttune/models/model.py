"""Decoder-only language models of the Qwen2/Qwen2.5, Qwen3 and Llama/Mistral families.

One file, read top to bottom: the config parsed from a Hugging Face `config.json`, then RMSNorm, rotary
embeddings, attention, the MLP, the decoder layer, the decoder, and `CausalLM`, which owns the head.

Parameter names follow transformers (`model.layers.0.self_attn.q_proj.weight`, ...), so a safetensors
checkpoint loads one to one. The numerics follow transformers' eager/SDPA code step by step (RMSNorm in
fp32, RoPE tables in fp32 cast to the activation dtype, `q * cos + rotate_half(q) * sin`), which is what
makes logits agree to ~1e-6 in fp32 in the parity tests.

Shapes: B batch, T tokens, H hidden, I intermediate, V vocab, n_q / n_kv heads, hd head dim.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fasttune.errors import ConfigError
from fasttune.models.attention import attention
from fasttune.models.chunked_loss import chunked_cross_entropy
from fasttune.models.config_checks import REQUIRED, check_sizes, checked_head_dim, rope_parameters

log = logging.getLogger("fasttune")

# model_type -> what differs between the families. Everything else is shared.
#   qkv_bias: Qwen2 has biases on q/k/v (not o); Llama/Mistral/Qwen3 follow `attention_bias` (default off).
#   qk_norm:  Qwen3 normalises each head of q and k with an RMSNorm over hd before RoPE.
_FAMILIES = {
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
    "llama": dict(qkv_bias=False, qk_norm=False),
    "mistral": dict(qkv_bias=False, qk_norm=False),
}


@dataclass
class ModelConfig:
    """The architecture, read from a Hugging Face `config.json` with transformers' defaults for what is
    optional. `hf` keeps the original dictionary so that saving writes back every field it had."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    hf: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a `config.json` dictionary; `source` names the file in error messages."""
        model_type = d.get("model_type")
        if model_type not in _FAMILIES:
            archs = d.get("architectures")
            raise ConfigError(
                f"{source}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"fasttune supports model_type in {sorted(_FAMILIES)}"
            )
        missing = [k for k in REQUIRED if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)} for {model_type}")
        check_sizes(d, source)
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")

        n_q = d["num_attention_heads"]
        n_kv = d.get("num_key_value_heads") or n_q
        head_dim = checked_head_dim(d, model_type, source)

        fam = _FAMILIES[model_type]
        attention_bias = bool(d.get("attention_bias", False))
        theta, scaling = rope_parameters(d, source)

        # Qwen2/3 only use a sliding window when `use_sliding_window` is set; Mistral whenever it is given.
        window = d.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            window = None

        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_q,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=fam["qkv_bias"] or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=fam["qk_norm"],
            sliding_window=window,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            hf=dict(d),
        )


# ----------------------------------------------------------------------------------------------------------
# Building blocks


# Each class below records the ops it runs in `kernels`; models/kernels.py swaps a module for its fused twin
# (same parameters, same names) and back, so this file is only the PyTorch math.


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the weight multiply.

    With `residual`, the residual add comes first and both results are returned: (norm(x + residual),
    x + residual), the pair a decoder layer needs, which a fused kernel makes in one pass over [T, H]."""

    kernels = "torch"

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = residual + x
            return self.normalize(x), x
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, in fp32 on the CPU, with linear or Llama-3 scaling."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device="cpu") / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin tables [B, T, hd] for the given positions: fp32 angles, then cast to the activations."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, n, hd]; cos, sin [B, T, hd]. The "half-split" rotation used by HF Qwen and Llama weights."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    kernels = "torch"
    backend = "sdpa"  # of attention(): set per model by models/attention.py's set_attention_backend

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_q, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_q * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_q * self.hd, H, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.sliding_window = cfg.sliding_window

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, cache=None):
        """rope: what the decoder's `rope_inputs` made ((cos, sin) tables here).
        cache: this layer's slot of a KV cache (`fasttune.eval.generation.KVCache`), or None when training."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_q, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, k, rope)
        if cache is not None:  # generation: the cache stores k, v and attends to everything cached so far
            o = cache.attend(q, k, v, scale=self.hd**-0.5)
            return self.o_proj(o.reshape(B, T, self.n_q * self.hd))
        o = attention(
            q,
            k,
            v,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            scale=self.hd**-0.5,
            sliding_window=self.sliding_window,
            backend=self.backend,
        )
        return self.o_proj(o.reshape(B, T, self.n_q * self.hd))

    def rotate(self, q, k, rope):
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    kernels = "torch"

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, cache=None):
        a = self.self_attn(self.input_layernorm(x), rope, cu_seqlens, max_seqlen, cache)
        h, x = self.post_attention_layernorm(a, residual=x)  # x + a, and its norm
        return x + self.mlp(h)


class Decoder(nn.Module):
    """Embedding, the layers and the final norm: `model.*` in a Hugging Face checkpoint."""

    kernels = "torch"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # fp32 and never saved; made on the CPU even under a meta-device context so it is real at once.
        self.rope_config = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bf16) casts every floating buffer, but bf16 keeps 8 mantissa bits: at position 4096 the
        # angles would be off by up to 3.9 rad. Recompute the fp32 frequencies wherever the buffer went.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.rope_config).to(self.inv_freq.device)
        return self

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, cache=None):
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, cu_seqlens)
        rope = self.rope_inputs(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cu_seqlens, max_seqlen, None if cache is None else cache.layers[i])
        return self.norm(x)

    def rope_inputs(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """What every layer's `rotate` takes: the cos and sin tables [B, T, hd], made once per forward."""
        return rope_cos_sin(self.inv_freq, position_ids, dtype)


def default_position_ids(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """0..T-1 per row, or restarting at every sequence start of a packed row when cu_seqlens is given."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device)
    if cu_seqlens is not None:
        starts = cu_seqlens[:-1].to(input_ids.device)
        seq_index = torch.searchsorted(cu_seqlens[1:].to(input_ids.device), pos, right=True)
        pos = pos - starts[seq_index.clamp(max=len(starts) - 1)]
    return pos.unsqueeze(0).expand(B, T)


def packed_from_position_ids(
    position_ids: torch.Tensor, shape: torch.Size
) -> tuple[torch.Tensor, int] | None:
    """cu_seqlens and max_seqlen over the B*T tokens of `shape` laid end to end, read from position ids
    that start a new sequence inside a row; None when every row is one run of consecutive positions.

    As transformers' masks do (masking_utils.find_packed_sequence_indices, used whenever position_ids come
    without an attention mask): a token starts a sequence when its position is not the previous one + 1,
    so attention never crosses a restart to 0 or any other jump. Each row's start is a start too, which is
    what lets B > 1 rows be packed: every row is attended on its own, as in a batch. Reads the positions on
    the host (one sync), which is why only the public `logits`/`loss` do it, and only when no cu_seqlens
    is given: the trainer and the evaluation always pass cu_seqlens from the collator."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if (
        position_ids.dim() != 2
        or position_ids.shape[1] != shape[1]
        or position_ids.shape[0] not in (1, shape[0])
    ):
        raise ValueError(
            f"position_ids {tuple(position_ids.shape)} do not match input_ids {tuple(shape)}: "
            "give [B, T] or [1, T]"
        )
    position_ids = position_ids.expand(shape)
    starts = torch.ones(shape, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    first = starts.flatten().nonzero().flatten()
    if len(first) == shape[0]:  # the row starts only: no packing, the ordinary path is the same
        return None
    cu = torch.cat([first, first.new_tensor([starts.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# ----------------------------------------------------------------------------------------------------------
# The causal LM: decoder + head. The head is separate from the decoder so that a fused loss can own it.


class LossHead(nn.Module):
    """Mean cross-entropy over the targets that are not -100 of hidden states [B, T, H] through the
    head's weight [V, H], a chunk of tokens at a time: the [T, V] fp32 log-probabilities and their
    gradients are never whole (chunked_loss.py); for 16k tokens of Qwen2.5's 151,936-token vocabulary
    they would be 9.3 GiB.
    No parameters: the weight is `lm_head.weight`, passed in, so that checkpoints keep their names."""

    kernels = "torch"

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(hidden, weight, targets)


@dataclass
class ModelInfo:
    """What a model knows besides its weights: where it was loaded from and what was done to it. Set by the
    loaders (weights.py, qlora.py), LoRA (lora.py) and the ops and attention choices (kernels.py,
    attention.py); read by export, evaluation and generation."""

    source_path: str | None = None  # the folder it was loaded from
    generation_config: dict = field(default_factory=dict)  # the folder's generation_config.json
    lora_config: Any = None  # the adapters' models.lora.LoraConfig, once applied
    lora_targets: list[str] | None = None  # the adapted modules' names
    kernels: str = "torch"  # the ops it runs: "torch" (this file's math) or models/kernels.py's fused twins
    attention: str = "sdpa"  # its attention layers' backend request (attention.py)


class CausalLM(nn.Module):
    """`forward` returns hidden states [B, T, H]; `logits` and `loss` apply the head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.loss_head = LossHead()
        self.tie_weights()
        self.info = ModelInfo()

    def tie_weights(self) -> None:
        """A tied head shares the embedding's Parameter, so both gradients land in one tensor."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, cache=None
    ) -> torch.Tensor:
        """input_ids [B, T] -> hidden states [B, T, H] after the final norm.

        Packed batches: B = 1, `cu_seqlens` [N+1] (int32 offsets of the N sequences in the row) and
        `position_ids` restarting at 0 for each; attention never crosses a sequence boundary.

        Generation: `cache` (a `fasttune.eval.generation.KVCache`, whose `layers[i].attend(q, k, v, scale)`
        stores layer i's keys and values and attends to all that is cached) with the real `position_ids` of
        the new tokens; the cache decides which keys each query sees. None (the default) changes nothing.
        """
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(
                f"packed input (cu_seqlens) needs batch size 1, got input_ids {tuple(input_ids.shape)}"
            )
        if cache is not None and position_ids is None:
            raise ValueError("a KV cache needs position_ids: the real positions of the new tokens")
        return self.model(input_ids, position_ids, cu_seqlens, max_seqlen, cache)

    def _hidden(self, input_ids, position_ids, cu_seqlens, max_seqlen) -> torch.Tensor:
        """forward, after reading packed sequences from position_ids when no cu_seqlens is given (see
        packed_from_position_ids); the B rows then run as one packed row and come back as [B, T, H]."""
        if position_ids is None or cu_seqlens is not None:
            return self(input_ids, position_ids, cu_seqlens, max_seqlen)
        packed = packed_from_position_ids(position_ids, input_ids.shape)
        if packed is None:
            return self(input_ids, position_ids, None, max_seqlen)
        B, T = input_ids.shape
        flat_positions = position_ids.expand(B, T).reshape(1, B * T)
        hidden = self(input_ids.reshape(1, B * T), flat_positions, *packed)
        return hidden.view(B, T, -1)

    def logits(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """Logits [B, T, V] in the model's dtype, as transformers computes them. Materialises [T, V]:
        for inspection and tests, not for training on a large vocabulary. Position ids that restart inside
        a row without cu_seqlens are packed sequences, as in transformers (packed_from_position_ids)."""
        return self.lm_head(self._hidden(input_ids, position_ids, cu_seqlens, max_seqlen))

    def loss(self, input_ids, targets, position_ids=None, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """Mean cross-entropy over targets that are not -100. Targets are already shifted: targets[t] is
        the token that follows input_ids[t], so a packed row carries -100 at each sequence's last token.
        Restarting position ids without cu_seqlens are packed sequences, as in `logits`.

        The head and the loss are `loss_head`'s: chunked, so the [T, V] logits are never whole."""
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
            )
        hidden = self._hidden(input_ids, position_ids, cu_seqlens, max_seqlen)
        return self.loss_head(hidden, self.lm_head.weight, targets)

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())
