"""The tests' fixtures and set-up: Triton's interpreter where there is no GPU, a tiny training run's inputs,
and the real Qwen2.5 tokenizer from tests/fixtures. Helpers that tests import by name are in helpers.py."""

from __future__ import annotations

import os

# Triton kernels run through Triton's interpreter where there is no NVIDIA GPU. It must be chosen before
# anything imports triton, hence here, first.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fasttune.models.tokenizer import write_builtin_tokenizer  # noqa: E402
from helpers import QWEN_FIXTURE, hf_model  # noqa: E402


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
