"""Named regions of a `fasttune profile` trace: `with region("attention"):`.

A leaf with nothing of fasttune below it, so that the model, the step and the profiler can all name
regions without importing each other. `region` returns a `contextlib.nullcontext()` unless `REGIONS_ON`
is set, which only the profiler does, for the length of a profiled run: a normal run pays one global read
per region and torch.compile sees no profiler call.
"""

from __future__ import annotations

import contextlib

PREFIX = "fasttune."
REGIONS = ("embedding", "attention", "mlp", "norm", "head_loss", "optimizer")
REGIONS_ON = False  # set only by fasttune.profiling.profile.profile_run, for the length of the run


def region(name: str):
    """A profiler range named `fasttune.<name>` while profiling; a no-op otherwise."""
    if not REGIONS_ON:
        return contextlib.nullcontext()
    import torch  # only while profiling, when torch is long loaded

    return torch.profiler.record_function(PREFIX + name)


# Where the regions are, by the last part of a module's name (the Hugging Face names the model keeps): a
# region is the module's forward, wrapped from outside, so the model's code names no region. Qwen3's
# q_norm/k_norm are not marked: they run inside `self_attn`, and regions never nest.
MARKS = {
    "embed_tokens": "embedding",
    "self_attn": "attention",
    "input_layernorm": "norm",
    "post_attention_layernorm": "norm",
    "norm": "norm",  # the decoder's final norm (`model.norm`)
    "mlp": "mlp",
    "loss_head": "head_loss",
}


def mark_regions(model) -> list[str]:
    """Wrap the forward of each module that MARKS names in its region (for `fasttune profile`; the loop
    does it before compile and FSDP, so they see the wrapped forwards). Returns the marked module names."""
    marked = []
    for path, module in model.named_modules():
        name = MARKS.get(path.rpartition(".")[2])
        if name is None or "forward" in vars(module):  # already marked
            continue
        module.forward = _in_region(module.forward, name)
        marked.append(path)
    return marked


def _in_region(forward, name: str):
    def marked(*args, **kwargs):
        with region(name):
            return forward(*args, **kwargs)

    return marked
