"""The values a run's choices can take, one place: the config validates against these, the planner and
the CLI offer them, the ops and the attention layer decide among them. A leaf: it imports nothing."""

METHODS = ("full", "lora", "qlora")
STRATEGIES = ("auto", "ddp", "fsdp")  # auto: train/parallelize.py's choose_strategy decides
KERNELS = ("auto", "triton", "torch")  # auto: Triton on CUDA, the PyTorch math elsewhere
ATTENTION = ("auto", "sdpa", "flash")  # auto: flash-attn where it can run, SDPA elsewhere
PRECISIONS = ("bf16", "bf16-pure", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("stop", "skip")
