"""MFU's arithmetic: FLOPs per token against the architecture's reference figures, and the GPU peak table."""

import json

import pytest
import torch

import fasttune
from fasttune.models.model import ModelConfig
from fasttune.train import metrics
from helpers import QWEN_FIXTURE


@pytest.fixture(scope="module")
def qwen05b():
    with torch.device("meta"):
        return fasttune.CausalLM(ModelConfig.from_hf(json.loads((QWEN_FIXTURE / "config.json").read_text())))


def test_flops_per_token_match_the_reference_figures(qwen05b):
    # docs/ARCHITECTURE.md: 494,032,768 parameters (tied head: the embedding is also the head's matmul),
    # 6N = 2.96 GFLOP per token, plus about 0.13 MFLOP per token of document length.
    assert metrics.matmul_parameters(qwen05b) == 494_032_768
    assert metrics.flops_per_token(qwen05b, 0.0) == 6 * 494_032_768
    per_len = metrics.flops_per_token(qwen05b, 1000.0) - metrics.flops_per_token(qwen05b, 0.0)
    assert per_len / 1000 == pytest.approx(0.129e6, rel=0.01)
    assert metrics.flops_per_token(qwen05b, 0.0, lora=True) == 4 * 494_032_768


def test_untied_input_embedding_is_not_a_matmul():
    cfg = ModelConfig.from_hf(
        dict(
            model_type="llama",
            vocab_size=100,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    )
    with torch.device("meta"):
        model = fasttune.CausalLM(cfg)
    assert metrics.matmul_parameters(model) == model.num_parameters() - 100 * 8


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("Some Future GPU", None),
    ],
)
def test_peak_flops_by_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = metrics.peak_flops(torch.device("cuda"))
    assert peak == (None if tflops is None else tflops * 1e12)
    assert metrics.peak_flops(torch.device("cpu")) is None
