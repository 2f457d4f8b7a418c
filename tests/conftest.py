"""Shared test helpers: tiny random Hugging Face checkpoints written by transformers itself, and the real
Qwen2.5 tokenizer from tests/fixtures (decompressed once per session)."""

from __future__ import annotations

import os

# Triton kernels run through Triton's interpreter where there is no NVIDIA GPU. It must be chosen before
# anything imports triton, hence here, first.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fasttune.models.tokenizer import write_builtin_tokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
QWEN_FIXTURE = FIXTURES / "qwen2.5-0.5b-instruct"
TEMPLATES = FIXTURES / "chat-templates"

# Tiny configs, one per supported family and head layout, with sizes that are not powers of two.
FAMILIES = {
    # Qwen2/2.5: QKV bias, GQA 6:2, tied head (as Qwen2.5-0.5B).
    "qwen2_tied": (
        "Qwen2",
        dict(
            vocab_size=131,
            hidden_size=60,
            intermediate_size=84,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        ),
    ),
    # Qwen2 untied, GQA 5:1, hd 8.
    "qwen2_untied": (
        "Qwen2",
        dict(
            vocab_size=101,
            hidden_size=40,
            intermediate_size=72,
            num_hidden_layers=3,
            num_attention_heads=5,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen3: q/k RMSNorm, explicit head_dim (12, not hidden/heads = 8), no bias, tied.
    "qwen3": (
        "Qwen3",
        dict(
            vocab_size=127,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=12,
            tie_word_embeddings=True,
        ),
    ),
    # Llama 3.1-style: no bias, 7 heads (MHA), untied, llama3 RoPE scaling.
    "llama": (
        "Llama",
        dict(
            vocab_size=113,
            hidden_size=56,
            intermediate_size=90,
            num_hidden_layers=2,
            num_attention_heads=7,
            num_key_value_heads=7,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    # Mistral: a sliding window shorter than the test sequences.
    "mistral": (
        "Mistral",
        dict(
            vocab_size=109,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=16,
        ),
    ),
}


def hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of `family` with every parameter random (biases and norm weights included, so
    that a parity test cannot pass by zeros or ones)."""
    import transformers

    prefix, kw = FAMILIES[family]
    cfg = getattr(transformers, f"{prefix}Config")(**{**kw, "max_position_embeddings": 512, **overrides})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model.eval()


def write_checkpoint(path: Path, family: str, dtype=torch.float32, seed: int = 0, **save_kwargs):
    """Save a random transformers model of `family` to `path`; returns the fp32 model."""
    model = hf_model(family, seed)
    model.to(dtype).save_pretrained(path, **save_kwargs)
    return model.float()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny training run's inputs: a small corpus (data.jsonl), a BPE trained on it, and a tiny random
    Qwen2 checkpoint with that vocabulary (model/). Used by the loop's and the profiler's tests."""
    from fasttune.data import synth
    from fasttune.data.records import write_jsonl
    from fasttune.models import builtin

    root = tmp_path_factory.mktemp("run")
    records = synth.generate(240, seed=3)
    write_jsonl(root / "data.jsonl", records)
    tok = builtin.train_tokenizer([r[k] for r in records for k in ("input", "output")], vocab_size=300)
    model = hf_model("qwen2_tied", vocab_size=tok.vocab_size)
    model.save_pretrained(root / "model")
    tok.save(root / "model")
    return root


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """Qwen2.5-0.5B-Instruct's tokenizer folder (no weights)."""
    d = tmp_path_factory.mktemp("qwen2.5-tokenizer")
    for f in ("config.json", "generation_config.json"):
        shutil.copy(QWEN_FIXTURE / f, d / f)
    write_builtin_tokenizer(d)  # the same tokenizer, bundled with the package (src/fasttune/assets)
    return d


# ----------------------------------------------------------------------------------------------------------
# Checking a kernel against fp64


BF16_DOT_SKIP = (
    "Triton's interpreter computes tl.dot on bf16 inputs wrongly (it multiplies the bit "
    "patterns; triton-lang/triton#11584): bf16 dot kernels are checked on a GPU"
)


def dot_dtype_skip(dtype, device="cpu"):
    """Skip marker reason for bf16 cases of tl.dot kernels in the interpreter, else None."""
    if dtype == torch.bfloat16 and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return BF16_DOT_SKIP
    return None


def assert_fp64_close(
    name: str, got: torch.Tensor, torch_same_dtype: torch.Tensor, exact: torch.Tensor, factor: float = 2.0
) -> None:
    """The kernel's max error against the fp64 result is at most `factor` x the PyTorch reference's
    error in the same dtype (plus a few ulps of the result's scale, for when that error is ~0)."""
    assert got.shape == exact.shape, (name, got.shape, exact.shape)
    assert got.dtype == torch_same_dtype.dtype, (name, got.dtype, torch_same_dtype.dtype)
    err = (got.double() - exact).abs().max().item()
    ref = (torch_same_dtype.double() - exact).abs().max().item()
    floor = 4 * torch.finfo(got.dtype).eps * max(exact.abs().max().item(), 1e-30)
    assert err <= factor * ref + floor, f"{name}: kernel error {err:.3e} > {factor} x reference's {ref:.3e}"
