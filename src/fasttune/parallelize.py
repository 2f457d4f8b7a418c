"""The one place that changes how an unchanged model runs: activation checkpointing and torch.compile per
decoder block (FSDP2/DDP join them later). Applied from outside; parameter names do not change.

Composition: each block's own forward is compiled first, and checkpointing then wraps the compiled
function, so the recomputation in the backward pass runs the compiled code too. The other order (compile
a block whose forward is already a checkpoint wrapper, e.g. with `nn.Module.compile`) traced no graph at
all in torch 2.13: the block silently ran eager. The tests check that graphs were compiled.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

from fasttune.model import CausalLM

log = logging.getLogger("fasttune")


def parallelize(model: CausalLM, activation_checkpointing: bool = False, compile: bool = False) -> None:
    """Activation checkpointing keeps only each block's input for the backward pass and recomputes the
    rest: activation memory falls from layers x (block activations) to layers x H per token, for about a
    third more compute. compile: one graph, reused by every block (they share the code and shapes)."""
    if not (activation_checkpointing or compile):
        return
    if compile:
        log.info(
            "torch.compile: with the SDPA reference attention each block's graph breaks where packed "
            "sequences are split (cu_seqlens is read on the host); flash-attn avoids that"
        )
    for layer in model.model.layers:
        forward = layer.forward
        if compile:
            forward = torch.compile(forward)
        if activation_checkpointing:
            forward = functools.partial(checkpoint, forward, use_reentrant=False)
        layer.forward = forward
    log.info(
        "decoder blocks: %s",
        " + ".join(
            name
            for name, on in (
                ("torch.compile", compile),
                ("activation checkpointing", activation_checkpointing),
            )
            if on
        ),
    )
