"""Errors that fasttune raises for bad input: each message names the file, key or shape at fault."""


class FasttuneError(Exception):
    """Base class: bad input that the user can fix (as opposed to a bug in fasttune)."""


class ConfigError(FasttuneError, ValueError):
    """A model `config.json` (or later a training config) that fasttune cannot use."""


class CheckpointError(FasttuneError, ValueError):
    """A checkpoint folder whose weights do not match its config: missing, unexpected or mis-shaped keys,
    unreadable or truncated safetensors files, a broken shard index."""


class TokenizerError(FasttuneError, ValueError):
    """A tokenizer folder or chat template that fasttune cannot use."""
