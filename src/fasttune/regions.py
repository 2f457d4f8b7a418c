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
