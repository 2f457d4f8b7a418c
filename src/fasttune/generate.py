"""Text generation. For now the reference: greedy decoding without a KV cache, one prompt at a time,
recomputing the whole prefix at every step (O(T^2) work, exact, simple)."""

from __future__ import annotations

import torch

from fasttune.model import CausalLM


@torch.no_grad()
def greedy_nocache(model: CausalLM, prompt: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """The new token ids after `prompt`, up to and including the first stop token."""
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
