"""fasttune: fast, honest fine-tuning of small Qwen-family language models.

Public API:
    load_model(path, dtype=None, device="cpu") -> CausalLM   # a Hugging Face safetensors folder
    save_model(model, path, tokenizer=None)                  # back to a folder transformers loads
    load_tokenizer(path) -> Tokenizer                         # tokenizer.json + chat template
"""

from fasttune.attention import set_attention_backend
from fasttune.errors import CheckpointError, ConfigError, FasttuneError, TokenizerError
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
    "load_model",
    "load_tokenizer",
    "save_model",
    "set_attention_backend",
]
