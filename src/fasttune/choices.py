"""The values a run's choices can take, one place: the config validates against these, the planner and
the CLI offer them, the ops and the attention layer decide among them. A leaf: it imports nothing."""

METHODS = ("full", "lora", "qlora")
STRATEGIES = ("auto", "ddp", "fsdp")  # auto: train/parallelize.py's choose_strategy decides
KERNELS = ("auto", "triton", "torch")  # auto: Triton on CUDA, the PyTorch math elsewhere
ATTENTION = ("auto", "sdpa", "flash")  # auto: flash-attn where it can run, SDPA elsewhere
PRECISIONS = ("bf16", "bf16-pure", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("stop", "skip")
# What the CLI offers before it imports any library module (`fasttune --help` must not import torch):
DATA_FORMATS = ("io", "messages", "alpaca")  # data/records.py: the JSONL shapes of an example
SPLITS = ("train", "val", "test")  # data/records.py: what `fasttune data prepare` writes
TOO_LONG = ("drop", "truncate", "error")  # data/packing.py: what an example over max_seq_len becomes
EXPORT_FORMATS = ("hf", "peft", "merged", "gguf")  # export/formats.py
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")  # export/gguf.py: the weights' GGUF types
DTYPES = (
    "float32",
    "bfloat16",
    "float16",
)  # a model's dtype (models/weights.parse_dtype: also fp32, bf16, fp16)
OPS = ("rms_norm", "rope", "swiglu", "linear_cross_entropy", "lora_linear")  # fasttune.ops, profile --op
