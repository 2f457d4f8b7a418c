"""Helpers that tests import by name (`from helpers import ...`); fixtures stay in conftest.py.

Processes started by a test never share an output stream as the channel for what the test asserts: two
ranks printing at once into one pipe interleave mid-line (CI saw `'rank 0: True Falserank 1: True
False'`). Each rank's output goes to a file of its own, through torchrun's own log directory
(`--log-dir` and `--tee`, which torchrun also reads from the `PET_LOG_DIR` and `PET_TEE` environment
variables, so a nested `fasttune run --nproc N` honours them), or the rank writes its result file itself.
Rendezvous ports come from the OS (`--standalone` binds port 0), never from a fixed number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
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


def torchrun_env(log_dir: Path, **extra: str) -> dict[str, str]:
    """The environment for a test's torchrun launch: one intra-op thread per process (two processes on
    two cores), and every rank's stdout and stderr teed into a file of its own under `log_dir`."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)  # `import helpers`
    env = {"OMP_NUM_THREADS": "1", "PET_LOG_DIR": str(log_dir), "PET_TEE": "3", "PYTHONPATH": path}
    return {**os.environ, **env, **extra}


def rank_logs(log_dir: Path, stream: str = "stdout") -> dict[int, str]:
    """Each local rank's `stream` ("stdout" or "stderr") as torchrun wrote it: `log_dir/<run
    id>/attempt_<k>/<rank>/<stream>.log`. With several launches into one folder (a run and its resume),
    give each launch its own `log_dir`; an ambiguous folder is an error rather than a guess."""
    runs = [p for p in Path(log_dir).iterdir() if p.is_dir()] if Path(log_dir).is_dir() else []
    if len(runs) != 1:
        raise AssertionError(f"expected one torchrun log folder in {log_dir}, found {len(runs)}")
    attempts = sorted(runs[0].glob("attempt_*"), key=lambda p: int(p.name.split("_")[1]))
    if not attempts:
        raise AssertionError(f"no attempt folder in {runs[0]}")
    return {
        int(d.name): (d / f"{stream}.log").read_text(errors="replace")
        for d in attempts[-1].iterdir()
        if d.is_dir() and d.name.isdigit()
    }


def torchrun(
    script: Path, log_dir: Path, nproc: int = 2, args=(), env=None, timeout: float = 300
) -> dict[int, str]:
    """Run `script ARGS` on `nproc` local ranks (gloo on the CPU) and return each rank's stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(script), *args]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=torchrun_env(log_dir, **(env or {}))
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return rank_logs(log_dir)


def write_rank_result(folder: Path, rank: int, result) -> None:
    """A rank's result as JSON in a file of its own, written under a temporary name and renamed, so the
    reader never sees half a file (the test imports this module inside the rank's script)."""
    folder = Path(folder)
    tmp = folder / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, folder / f"rank-{rank}.json")


def read_rank_results(folder: Path, nproc: int) -> list:
    """Every rank's result, in rank order; a missing one is an error naming it."""
    out = []
    for rank in range(nproc):
        path = Path(folder) / f"rank-{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no result ({path})"
        out.append(json.loads(path.read_text()))
    return out


def tiny_run_overrides(setup: Path, out, *extra: str, **keys) -> list[str]:
    """`fasttune run` overrides of a tiny CPU run on the `setup` fixture's model and corpus (fp32, 512-token
    micro-batches, lr 1e-3), then `keys` as key=value (each test's own: warmup, max_steps, ...), then
    `extra` (key=value or ~key strings, last so that they win)."""
    return [
        f"model={setup / 'model'}",
        f"data.files=[{setup / 'data.jsonl'}]",
        f"output_dir={out}",
        "precision=fp32",
        "device=cpu",
        "micro_batch_tokens=512",
        "max_seq_len=512",
        "data.system_prompt=none",
        "lr=1e-3",
        *(f"{k}={v}" for k, v in keys.items()),
        *extra,
    ]


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
