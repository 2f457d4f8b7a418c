"""What `fasttune plan` knows without a model folder: the shapes of published models and the GPUs.

Shapes are the architecture fields of each model's public config.json on the Hugging Face Hub
(huggingface.co/<org>/<name>/blob/main/config.json); fields that do not change memory or FLOPs (token ids,
max_position_embeddings of the instruct variants) are left out. Checked against copies of those files:
Qwen2.5-0.5B against tests/fixtures/qwen2.5-0.5b-instruct/config.json; Qwen2.5-3B/7B/14B, Qwen3-4B/8B and
Llama-3.1-8B against the copies in github.com/citsjtu2020/LLM-Prof (sglang/Model_Config.md); Qwen2.5-1.5B
and Qwen3-0.6B from their published config.json files; Qwen3-1.7B against a copy in a test of a public
repository (a Qwen3-1.7B config with H 2048, I 6144, 28 layers, 16/8 heads, head_dim 128, tied);
Mistral-7B-v0.1 against github.com/sumitdotml/transformers (mistral-7b-v0.1/README.md).

GPUs: memory is the spec sheet's capacity, read as GiB (these memories come in binary sizes; the driver
reports within 1% of it: 24,564 MiB on an RTX 4090, ~140 GiB on an H200). TFLOP/s are dense (no
sparsity) bf16 tensor-core peaks with fp32 accumulation, from the vendor's datasheet or architecture
whitepaper: fasttune.train.metrics.PEAK_TFLOPS, which the training loop uses for its MFU, is the one table.
"""

from __future__ import annotations

from dataclasses import dataclass

from fasttune.train.metrics import PEAK_TFLOPS as _PEAK  # the loop's MFU uses the same peaks

_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1e6, rms_norm_eps=1e-6)
_QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1e6, rms_norm_eps=1e-6)

SHAPES: dict[str, dict] = {
    # huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json
    "qwen2.5-0.5b": dict(
        _QWEN2,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/config.json
    "qwen2.5-1.5b": dict(
        _QWEN2,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/config.json
    "qwen2.5-3b": dict(
        _QWEN2,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
    "qwen2.5-7b": dict(
        _QWEN2,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # huggingface.co/Qwen/Qwen2.5-14B-Instruct/blob/main/config.json
    "qwen2.5-14b": dict(
        _QWEN2,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
    "qwen3-0.6b": dict(
        _QWEN3,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # huggingface.co/Qwen/Qwen3-1.7B/blob/main/config.json
    "qwen3-1.7b": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # huggingface.co/Qwen/Qwen3-4B/blob/main/config.json
    "qwen3-4b": dict(
        _QWEN3,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
    "qwen3-8b": dict(
        _QWEN3,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    # huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama-3.1-8b": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        max_position_embeddings=131072,
    ),
    # huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    "mistral-7b": dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        max_position_embeddings=32768,
    ),
}


@dataclass(frozen=True)
class GPU:
    label: str  # as in torch.cuda.get_device_name (a substring of it)
    memory_gib: float
    tflops: float  # dense bf16 tensor-core peak
    bf16: bool = True  # bf16 tensor cores (Ampere and later)
    source: str = ""


GPUS: dict[str, GPU] = {
    "rtx3090": GPU(
        "RTX 3090", 24, _PEAK["RTX 3090"], source="NVIDIA Ampere GA102 whitepaper (FP32 accumulate)"
    ),
    "rtx4080": GPU("RTX 4080", 16, _PEAK["RTX 4080"], source="NVIDIA Ada Lovelace architecture whitepaper"),
    "rtx4090": GPU("RTX 4090", 24, _PEAK["RTX 4090"], source="NVIDIA Ada Lovelace architecture whitepaper"),
    "a10": GPU("A10", 24, _PEAK["A10"], source="NVIDIA A10 datasheet (250 with sparsity)"),
    "a10g": GPU("A10G", 24, _PEAK["A10G"], source="as fasttune.train.metrics.PEAK_TFLOPS"),
    "l4": GPU("L4", 24, _PEAK["L4"], source="NVIDIA L4 datasheet (242 with sparsity)"),
    "l40s": GPU("L40S", 48, _PEAK["L40S"], source="NVIDIA L40S datasheet (733 with sparsity)"),
    "t4": GPU(
        "T4",
        16,
        _PEAK["T4"],
        bf16=False,
        source="NVIDIA T4 datasheet: FP16 mixed precision (Turing: no bf16)",
    ),
    "a100-40g": GPU("A100", 40, _PEAK["A100"], source="NVIDIA A100 datasheet (624 with sparsity)"),
    "a100-80g": GPU("A100", 80, _PEAK["A100"], source="NVIDIA A100 datasheet (624 with sparsity)"),
    "h100": GPU("H100", 80, _PEAK["H100"], source="NVIDIA H100 SXM datasheet (1,979 with sparsity)"),
    "h100-pcie": GPU(
        "H100 PCIe", 80, _PEAK["H100 PCIe"], source="NVIDIA H100 PCIe datasheet (1,513 with sparsity)"
    ),
    "h200": GPU("H200", 141, _PEAK["H200"], source="NVIDIA H200 datasheet (1,979 with sparsity)"),
}
