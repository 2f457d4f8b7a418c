"""fasttune: fast, honest fine-tuning of small Qwen-family language models.

Public API:
    load_model(path, dtype=None, device="cpu") -> CausalLM   # a Hugging Face safetensors folder
    save_model(model, path, tokenizer=None)                  # back to a folder transformers loads
    load_tokenizer(path) -> Tokenizer                         # tokenizer.json + chat template
    generate(model, prompts, max_new_tokens=128, ...) -> list[list[int]]   # KV-cache decoding

`fasttune.generate` is the function; the module of the same name is `from fasttune.generate import ...`.
"""

from fasttune.attention import set_attention_backend
from fasttune.errors import CheckpointError, ConfigError, FasttuneError, TokenizerError
from fasttune.generate import generate, load_for_generation  # the function shadows the module's name here
from fasttune.model import CausalLM, ModelConfig
from fasttune.tokenizer import ChatEncoding, Tokenizer, load_tokenizer
from fasttune.weights import check_checkpoint, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "ChatEncoding",
    "CheckpointError",
    "ConfigError",
    "FasttuneError",
    "ModelConfig",
    "Tokenizer",
    "TokenizerError",
    "check_checkpoint",
    "generate",
    "load_for_generation",
    "load_model",
    "load_tokenizer",
    "save_model",
    "set_attention_backend",
]
