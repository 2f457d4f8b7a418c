"""fasttune: fast, honest fine-tuning of small Qwen-family language models.

Public API:
    load_model(path, dtype=None, device="cpu") -> CausalLM   # a Hugging Face safetensors folder
    save_model(model, path, tokenizer=None)                  # back to a folder transformers loads
    load_tokenizer(path) -> Tokenizer                         # tokenizer.json + chat template
    generate(model, prompts, max_new_tokens=128, ...) -> list[list[int]]   # KV-cache decoding

The names load on first use (PEP 562): `import fasttune` and `fasttune --help` do not import torch.
"""

from __future__ import annotations

import importlib

from fasttune.version import __version__

# name -> the module that owns it; imported when the name is first read
_EXPORTS = {
    "CausalLM": "fasttune.models.model",
    "ModelConfig": "fasttune.models.model",
    "ChatEncoding": "fasttune.models.tokenizer",
    "Tokenizer": "fasttune.models.tokenizer",
    "load_tokenizer": "fasttune.models.tokenizer",
    "check_checkpoint": "fasttune.models.weights",
    "load_model": "fasttune.models.weights",
    "save_model": "fasttune.models.weights",
    "generate": "fasttune.eval.generation",
    "load_for_generation": "fasttune.eval.generation",
    "set_attention_backend": "fasttune.models.attention",
    "CheckpointError": "fasttune.errors",
    "ConfigError": "fasttune.errors",
    "FasttuneError": "fasttune.errors",
    "TokenizerError": "fasttune.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fasttune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later reads are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
