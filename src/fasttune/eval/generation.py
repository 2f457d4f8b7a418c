"""Text generation with a KV cache: greedy decoding and sampling for batches of prompts.

    generate(model, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0,
             repetition_penalty=1.0, stop_token_ids=(), seed=None, batch_size=None) -> list[list[int]]
    load_for_generation(path, adapter=None, dtype=None, device="auto") -> (model, tokenizer)
    greedy_nocache(model, prompt, max_new_tokens, stop_ids)   # the O(T^2) reference the tests compare to

How a batch runs (`KVCache`). The cache holds, per layer, keys and values [B, n_kv, max_len, hd],
allocated once. Rows are left-padded: prompt b occupies slots [T0 - len_b, T0), T0 being the longest
prompt, and every later step writes one new slot, the same one for all rows. A shared write slot keeps a
decode step one plain slice assignment and lets every row advance together; the price is T0 - len_b empty
slots per row, which a boolean mask of valid slots hides from attention (they hold zeros, weighted 0).
Positions (RoPE) are each row's real ones: 0..len_b-1 for the prompt, then len_b, len_b + 1, ...,
independent of the padding.

  prefill: the prompts run as one packed row (cu_seqlens, no padding at all) through the same varlen
           attention as training (flash-attn where available); each layer scatters its keys and values
           into the rows' slots. The logits of each prompt's last token give the first new token.
  decode:  one token per row; the query attends, by SDPA with the mask, to the valid slots (and, for a
           sliding window W, only to the W most recent positions, itself included: Mistral's rule, so
           the window is respected, not refused). Query heads are grouped by their KV head, so GQA
           reads the cache as it is, without repeating it per query head.

Rows that produce a stop token are finished: they are dropped from the batch (their cache rows too) and
never extended. The stop token is NOT part of the returned ids, so callers can decode them directly; a
row that returns fewer than max_new_tokens ids stopped on a stop token.

Choosing the next token, in transformers' order: the repetition penalty (CTRL: the logit of every token
already in the prompt or the output is divided by the penalty when positive, multiplied when negative),
then greedy argmax at temperature 0, else logits / temperature, top-k, top-p (nucleus: the smallest set of
most likely tokens whose probability reaches top_p), and a draw from a `torch.Generator` seeded by `seed`.

`fasttune.generate` (the package attribute) is the function `generate`, which shadows this module's name
there: import the rest with `from fasttune.eval.generation import ...` (which always finds the module).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from fasttune.devices import resolve_device
from fasttune.errors import ConfigError, FasttuneError
from fasttune.models.attention import attention
from fasttune.models.folders import resolve_source
from fasttune.models.lora import load_adapter
from fasttune.models.model import CausalLM, ModelConfig
from fasttune.models.tokenizer import Tokenizer, load_tokenizer
from fasttune.models.weights import load_model, parse_dtype

log = logging.getLogger("fasttune")

DEFAULT_BATCH_SIZE = 64  # prompts per batch when batch_size is None: bounds the cache's memory


@torch.no_grad()
def greedy_nocache(model: CausalLM, prompt: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """The reference: the new token ids after `prompt`, up to and including the first stop token, recomputing
    the whole prefix at every step (O(T^2) work, exact, simple)."""
    device = next(model.parameters()).device
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.logits(torch.tensor([ids], device=device))[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out


# ----------------------------------------------------------------------------------------------------------
# The KV cache


class _LayerCache:
    """What layer i of the model sees: `attend(q, k, v, scale)` (see `CausalLM.forward`)."""

    __slots__ = ("cache", "i")

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def attend(self, q, k, v, scale):
        return self.cache.attend(self.i, q, k, v, scale)


class KVCache:
    """Keys and values of every layer for `batch` left-padded rows, preallocated [B, n_kv, max_len, hd] in
    the dtype of the first keys written. Use: `prefill(lengths)` or `decode()`, then one model forward
    with `cache=self`, then `commit()`."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device):
        self.n_kv, self.n_rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        self.window = cfg.sliding_window
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * cfg.num_hidden_layers
        self.v: list[torch.Tensor | None] = [None] * cfg.num_hidden_layers
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slot holds a real token
        self.length = 0  # slots written by committed forwards
        self.layers = [_LayerCache(self, i) for i in range(cfg.num_hidden_layers)]
        self._step: dict | None = None  # what the forward in progress writes and how it attends

    def prefill(self, lengths: list[int]) -> torch.Tensor:
        """Set up a packed forward of the prompts (B rows, lengths[b] tokens each, in row order): returns
        cu_seqlens [B+1] (int32). Row b's tokens go to slots [T0 - lengths[b], T0), T0 = max(lengths)."""
        if self.length:
            raise RuntimeError("KVCache.prefill: the cache already holds tokens")
        device = self.valid.device
        t0 = max(lengths)
        lens = torch.tensor(lengths, device=device)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        # Slot of packed token n of row b: T0 - len_b + (n - cu[b]).
        slots = torch.arange(int(lens.sum()), device=device) - cu[:-1].long()[rows] + (t0 - lens)[rows]
        self.valid[rows, slots] = True
        self._step = dict(kind="prefill", rows=rows, slots=slots, cu=cu, max_seqlen=t0, end=t0)
        return cu

    def decode(self, n: int = 1) -> None:
        """Set up a forward of n new tokens per row, written at slots [length, length + n) of every row."""
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise RuntimeError(f"KVCache: {end} slots needed, {self.max_len} allocated")
        self.valid[:, start:end] = True
        q_slot = torch.arange(start, end, device=self.valid.device)[:, None]
        k_slot = torch.arange(end, device=self.valid.device)[None, :]
        see = self.valid[:, None, :end] & (k_slot <= q_slot)  # [B, n, end]
        if self.window is not None:  # slots of one row are consecutive positions: slot distance = distance
            see = see & (q_slot - k_slot < self.window)
        B = see.shape[0]
        # Queries are grouped (rep, t) under their KV head (see attend): each group sees the same keys.
        mask = see[:, None].expand(B, self.n_rep, n, end).reshape(B, 1, self.n_rep * n, end)
        self._step = dict(kind="decode", start=start, end=end, mask=mask)

    def commit(self) -> None:
        self.length = self._step["end"]
        self._step = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the batch), e.g. to drop finished ones."""
        self.valid = self.valid[rows]
        self.k = [None if t is None else t[rows] for t in self.k]
        self.v = [None if t is None else t[rows] for t in self.v]

    # torch.compile (parallelize.py) may have compiled the layers: the cache's bookkeeping stays eager (a
    # graph break) so that the step's slot numbers do not become guards that recompile every step.
    @torch.compiler.disable
    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Store layer i's new keys/values (k, v [B, T, n_kv, hd]) and return attention [B, T, n_q, hd]."""
        step = self._step
        if step is None:
            raise RuntimeError("KVCache: call prefill() or decode() before the forward")
        if self.k[i] is None:
            shape = (self.valid.shape[0], self.n_kv, self.max_len, k.shape[-1])
            self.k[i] = torch.zeros(shape, dtype=k.dtype, device=k.device)  # zeros: never NaN under a mask
            self.v[i] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        kc, vc = self.k[i], self.v[i]
        if step["kind"] == "prefill":  # q, k, v [1, N, n, hd]: the prompts packed in one row
            kc[step["rows"], :, step["slots"]] = k[0]
            vc[step["rows"], :, step["slots"]] = v[0]
            return attention(
                q,
                k,
                v,
                cu_seqlens=step["cu"],
                max_seqlen=step["max_seqlen"],
                scale=scale,
                sliding_window=self.window,
            )
        start, end = step["start"], step["end"]
        kc[:, :, start:end] = k.transpose(1, 2)
        vc[:, :, start:end] = v.transpose(1, 2)
        B, T, n_q, hd = q.shape
        # [B, T, n_kv * rep, hd] -> [B, n_kv, rep * T, hd]: query head h uses KV head h // rep.
        qg = q.reshape(B, T, self.n_kv, self.n_rep, hd).permute(0, 2, 3, 1, 4).reshape(B, self.n_kv, -1, hd)
        o = F.scaled_dot_product_attention(
            qg, kc[:, :, :end], vc[:, :, :end], attn_mask=step["mask"], scale=scale
        )
        return o.view(B, self.n_kv, self.n_rep, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, n_q, hd)


# ----------------------------------------------------------------------------------------------------------
# Choosing the next token


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as transformers): where `seen` [B, V] is True, a positive logit is divided
    by `penalty` and a negative one multiplied by it, so a penalty > 1 always makes the token less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside the k largest of each row set to -inf (ties with the k-th kept); k <= 0: all kept."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep, per row, the most likely tokens up to and including the first one at which
    their cumulative probability reaches p (so the most likely token always stays); the rest -inf."""
    if p >= 1.0:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the probability of the tokens ranked above each one
    drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= p)
    return logits.masked_fill(drop, float("-inf"))


def choose_next(
    logits: torch.Tensor,
    seen: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row [B] from fp32 logits [B, V]; `seen` [B, V] marks the tokens the
    repetition penalty applies to."""
    if repetition_penalty != 1.0 and seen is not None:
        logits = penalize_repetition(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------------
# generate


def _check_arguments(
    model, prompts, max_new_tokens, temperature, top_p, top_k, repetition_penalty, batch_size
):
    problems = []
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        problems.append(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        problems.append(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        problems.append(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if not repetition_penalty > 0:
        problems.append(f"repetition_penalty must be > 0 (1: off), got {repetition_penalty!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        problems.append(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    if problems:
        raise FasttuneError("generate: " + "; ".join(problems))
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise FasttuneError(
            f"generate: prompts must be a list of token-id lists, got {type(prompts).__name__}"
        )
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) == 0:
            raise FasttuneError(f"generate: prompt {i} must be a non-empty list of token ids, got {p!r:.60}")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise FasttuneError(
                f"generate: prompt {i} has token id {bad[0]!r} outside the model's vocabulary [0, {vocab}) "
                "(a tokenizer that is not this model's?)"
            )


def generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop_token_ids=(),
    seed: int | None = None,
    batch_size: int | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (a list of token-id lists), in the prompts' order.

    Greedy at temperature 0 (top_k and top_p then do nothing), else sampling with temperature, top-k
    (0: off), top-p (1: off) and the repetition penalty (1: off). A row ends at its first stop token,
    which is not included, or after max_new_tokens. `seed` makes sampling reproducible (same prompts and
    arguments, same result); None draws from torch's global generator. Prompts run in batches of
    `batch_size` (None: up to 64), grouped by length to pad little; the results do not depend on the
    grouping for greedy decoding. Runs without gradients on the model's device and dtype, in eval mode;
    the model's training mode is restored afterwards.
    """
    _check_arguments(
        model, prompts, max_new_tokens, temperature, top_p, top_k, repetition_penalty, batch_size
    )
    prompts = [[int(t) for t in p] for p in prompts]
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return results
    device = model.lm_head.weight.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    options = dict(
        temperature=float(temperature),
        top_k=top_k,
        top_p=float(top_p),
        repetition_penalty=float(repetition_penalty),
        generator=generator,
    )
    stop = {int(t) for t in stop_token_ids}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    size = batch_size or DEFAULT_BATCH_SIZE
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for at in range(0, len(order), size):
                chunk = order[at : at + size]
                outs = _generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, stop, options)
                for i, out in zip(chunk, outs, strict=True):
                    results[i] = out
    finally:
        model.train(was_training)
    return results


def _generate_batch(
    model: CausalLM, prompts, max_new_tokens: int, stop: set[int], options
) -> list[list[int]]:
    device = model.lm_head.weight.device
    lengths = [len(p) for p in prompts]
    # The last new token is never fed back, so max_new_tokens - 1 decode slots suffice.
    cache = KVCache(model.config, len(prompts), max(lengths) + max_new_tokens - 1, device)
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    cu = cache.prefill(lengths)
    hidden = model(ids[None], positions[None], cache=cache)
    cache.commit()
    logits = model.lm_head(hidden[0, cu[1:].long() - 1]).float()

    seen = None
    if options["repetition_penalty"] != 1.0:  # the tokens of each row so far, for the penalty
        seen = torch.zeros(len(prompts), logits.shape[-1], dtype=torch.bool, device=device)
        rows = torch.repeat_interleave(
            torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device)
        )
        seen[rows, ids] = True
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the output row of each batch row
    position = torch.tensor(lengths, device=device)  # the next token's position in each row
    for step in range(max_new_tokens):
        token = choose_next(logits, seen, **options)
        chosen = token.tolist()  # one host sync per step: it decides which rows go on
        keep = []
        for j, t in enumerate(chosen):
            if t not in stop:
                out[live[j]].append(t)
                keep.append(j)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch: they cost nothing from here on
            rows = torch.tensor(keep, device=device)
            cache.keep(rows)
            token, position = token[rows], position[rows]
            seen = None if seen is None else seen[rows]
            live = [live[j] for j in keep]
        if seen is not None:
            seen[torch.arange(len(live), device=device), token] = True
        cache.decode()
        hidden = model(token[:, None], position[:, None], cache=cache)
        cache.commit()
        logits = model.lm_head(hidden[:, -1]).float()
        position = position + 1
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading a model to generate with


def load_for_generation(
    path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
) -> tuple[CausalLM, Tokenizer]:
    """(model, tokenizer) for `generate`, in eval mode.

    `path` is a Hugging Face folder (a full or merged model), a PEFT adapter folder (with
    adapter_config.json), whose `base_model_name_or_path` names the base folder, or a run folder; or give
    the base folder as `path` and the adapter folder as `adapter` (models/folders.py). The adapter stays
    unmerged, computed as in training (fp32 A and B beside the frozen base). The tokenizer comes from the
    adapter folder when it has one (fasttune saves it there, chat template included), else from the model
    folder. dtype: None takes config.json's; device "auto" takes CUDA when there is one."""
    base, adapter_dir = resolve_source(path, adapter)  # models/folders.py: the rule every command uses
    try:
        dtype = parse_dtype(dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = load_model(base, dtype=dtype, device=resolve_device(device))
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        log.info("adapter %s on %s", adapter_dir, base)
    has_tokenizer = adapter_dir is not None and (adapter_dir / "tokenizer.json").exists()
    tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base)
    model.eval()
    return model, tokenizer
