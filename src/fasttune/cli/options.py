"""The options that several commands share, each with one meaning, one help text and one default. Built
from literals and `fasttune.choices` only: the parsers are made before any library module (or torch) is
imported."""

from __future__ import annotations

from fasttune.choices import DTYPES

SEED = 0  # every command that draws at random draws the same for the same seed, by default too
AUTO_DEVICE = "auto"


def add_device(p, what: str = "") -> None:
    """--device: "auto" (cuda when available, else cpu), or a torch device name."""
    p.add_argument(
        "--device",
        default=AUTO_DEVICE,
        help=f"{what}cpu, cuda, cuda:1, ... (default: {AUTO_DEVICE}, cuda when available)",
    )


def device_or_none(device: str) -> str | None:
    """A --device value for the library functions that take None for "choose": "auto" is None."""
    return None if device == AUTO_DEVICE else device


def add_dtype(p, what: str = "", default: str = "as the checkpoint or config says") -> None:
    """--dtype: checked by the library (models.weights.parse_dtype), which also takes fp32, bf16, fp16:
    argparse choices would exit from inside the parser instead of the one error line the commands give."""
    p.add_argument("--dtype", help=f"{what}{', '.join(DTYPES)}, or fp32, bf16, fp16 (default: {default})")


def add_seed(p, what: str) -> None:
    p.add_argument("--seed", type=int, default=SEED, help=f"the seed of {what} (default: %(default)s)")


def add_sampling(p) -> None:
    """The decoding options of `fasttune.generate`, its defaults: greedy, 128 new tokens."""
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="0 is off (default: %(default)s)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling; 1 is off (default: %(default)s)"
    )
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 is off (default: %(default)s)")
    add_seed(p, "the sampling at temperatures above 0")


def add_system_prompt(p) -> None:
    p.add_argument(
        "--system-prompt",
        default="default",
        help="'default' (the template's), 'none', or the text of a system prompt",
    )
