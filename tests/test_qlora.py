"""QLoRA: the NF4 storage against a hand quantisation, the layer against LoRA on its dequantised weight
(outputs and every gradient, PyTorch and Triton paths), the layer-by-layer load against quantising a
loaded model and against transformers' `load_in_4bit`, the adapter in PEFT (onto the 4-bit model exactly,
onto the unquantised base within the NF4 error), a few training steps of `fasttune.train.loop.run`, and the
host-memory peak of loading."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

import transformers  # noqa: E402

import fasttune  # noqa: E402
from fasttune.errors import ConfigError  # noqa: E402
from fasttune.eval.generation import greedy_nocache  # noqa: E402
from fasttune.models.lora import LoraConfig, LoraLinear, count_parameters, lora_parameters, save_adapter  # noqa: E402
from fasttune.models.qlora import (  # noqa: E402
    NF4_BYTES_PER_WEIGHT,
    NF4Linear,
    QLoraLinear,
    load_qlora_model,
    merge_into_base,
    nf4_layers,
    qlora_linear,
)
from fasttune.train import loop as train  # noqa: E402
from fasttune.train.config import load_config  # noqa: E402
from helpers import dot_dtype_skip, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# The 16 NF4 levels as printed in the QLoRA paper (Dettmers et al. 2023, appendix E).
NF4_LEVELS = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
IDS = torch.tensor([[3, 17, 42, 5, 99, 0, 64, 21, 8, 77, 12]])


def randomise_adapters(model, seed=1, std=0.2):
    """Random A and B: a fresh B is zero, which would make every adapter comparison pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def linear(in_f, out_f, dtype, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


# ----------------------------------------------------------------------------------------------------------
# The storage and the layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_storage_matches_a_hand_quantisation(dtype):
    """Blocks of 64 consecutive weights (row-major, the last block short), each scaled by its absmax and
    rounded to the nearest NF4 level; the absmax values stored as 8-bit codes x an fp32 scale per 256
    blocks + an offset (double quantisation). Sizes: 1/2 + 1/64 + 4/16384 bytes per weight."""
    lin = linear(200, 37, dtype)  # 7,400 weights: 115.6 blocks, so a short last block
    layer = NF4Linear.from_linear(lin)
    n = lin.weight.numel()
    blocks = -(-n // 64)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == -(-n // 2)
    assert layer.absmax.dtype == torch.uint8 and layer.absmax.numel() == blocks
    assert layer.absmax2.dtype == torch.float32 and layer.absmax2.numel() == -(-blocks // 256)
    assert torch.allclose(layer.code, torch.tensor(NF4_LEVELS), atol=1e-7)
    assert NF4_BYTES_PER_WEIGHT == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))

    w = lin.weight.detach().float().flatten()
    w_blocks = F.pad(w, (0, blocks * 64 - n)).view(blocks, 64)
    absmax = w_blocks.abs().amax(1)
    # The stored absmax: code2[u8] * absmax2[block // 256] + offset, within 8-bit precision of the true one
    stored = layer.code2[layer.absmax.long()] * layer.absmax2.repeat_interleave(256)[:blocks] + layer.offset
    assert ((stored - absmax).abs() / absmax).max() < 0.02
    levels = torch.tensor(NF4_LEVELS)
    nearest = (w_blocks / absmax[:, None])[..., None].sub(levels).abs().argmin(-1)
    expected = (levels[nearest] * stored[:, None]).flatten()[:n].view_as(lin.weight).to(dtype)
    got = layer.dequantize()
    assert got.dtype == dtype
    # Ties to a level's midpoint may go either way: allow a few codes off by one level.
    mismatched = (got.float() - expected.float()).abs() > 1e-6 + 0.01 * got.float().abs()
    assert mismatched.sum() <= 3, int(mismatched.sum())
    # And the NF4 error itself: at most half the widest gap between levels (0.304 / 2) of the block absmax
    err = (got.float().flatten() - w)[:n].abs()
    assert (err <= 0.16 * stored.repeat_interleave(64)[:n] + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantising_in_chunks_gives_the_bytes_of_one_bitsandbytes_call(dtype, monkeypatch):
    """The loader quantises a layer a chunk of elements at a time (bitsandbytes' CPU path needs ~24
    bytes of temporaries per element): the same codes, scales and double quantisation as one call."""
    import bitsandbytes.functional as bnb_f

    import fasttune.models.qlora

    w = linear(200, 37, dtype).weight.detach()
    monkeypatch.setattr(fasttune.models.qlora, "QUANTIZE_CHUNK", 128)  # 58 chunks, the last one short
    layer = NF4Linear(200, 37, bias=False, dtype=dtype)
    layer.quantize_(w)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.weight, packed) and torch.equal(layer.absmax, state.absmax)
    assert torch.equal(layer.absmax2, state.state2.absmax) and torch.equal(layer.offset, state.offset)
    assert torch.equal(layer.dequantize(), bnb_f.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_layer_equals_f_linear_on_its_dequantised_weight(dtype):
    lin = linear(96, 80, dtype)
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(3, 5, 96, dtype=dtype)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))
    # compute dtype follows the weights; model.to(bf16) moves the bias but keeps the scales in fp32
    layer.to(torch.float64)
    assert layer.absmax2.dtype == layer.code2.dtype == layer.offset.dtype == torch.float32
    assert layer.weight.dtype == torch.uint8


def _lora_pair(dtype, dropout=0.0, seed=0):
    """A QLoraLinear and the reference: a LoraLinear whose base holds the dequantised weight."""
    lin = linear(96, 72, dtype, seed)
    q = QLoraLinear(NF4Linear.from_linear(lin), r=8, alpha=16, dropout=dropout)
    ref_base = nn.Linear(96, 72, bias=True).to(dtype)
    with torch.no_grad():
        ref_base.weight.copy_(q.base_layer.dequantize())
        ref_base.bias.copy_(q.base_layer.bias)
    ref = LoraLinear(ref_base, r=8, alpha=16, dropout=dropout)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for a, b in ((q.lora_A, ref.lora_A), (q.lora_B, ref.lora_B)):
            a.weight.copy_(torch.randn(a.weight.shape, generator=g) * 0.3)
            b.weight.copy_(a.weight)
    return q, ref


def _grads(module, x):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype))
    return y.detach(), x.grad, module.lora_A.weight.grad, module.lora_B.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_layer_and_its_gradients_equal_lora_on_the_dequantised_weight(dtype):
    """The PyTorch path: bnb.matmul_4bit for the base is F.linear on the dequantised weight, in the forward
    and for dx, so the output and dx, dA, dB are those of LoRA on that weight, bit for bit."""
    q, ref = _lora_pair(dtype)
    q.train(), ref.train()
    x = torch.randn(2, 9, 96, dtype=dtype)
    for got, want in zip(_grads(q, x), _grads(ref, x), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert q.lora_A.weight.grad.abs().max() > 0 and q.lora_B.weight.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_qlora_triton_path_equals_the_fused_lora_op_on_the_dequantised_weight(dtype, dropout):
    """kernels=triton: dequantise, then the fused LoRA GEMM (ops/lora_linear.py), forward and backward,
    with the same dropout draw: identical to `lora_linear` given the dequantised weight."""
    if reason := dot_dtype_skip(dtype):
        pytest.skip(reason)
    from fasttune.ops.lora_linear import lora_linear

    q, ref = _lora_pair(dtype, dropout)
    x = torch.randn(2, 9, 96, dtype=dtype)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    A = [m.lora_A.weight for m in (q, ref)]
    B = [m.lora_B.weight for m in (q, ref)]
    y_q = qlora_linear(
        xs[0], q.base_layer, A[0], B[0], q.scaling, dropout, True, torch.Generator().manual_seed(3)
    )
    y_r = lora_linear(
        xs[1],
        ref.base_layer.weight.detach(),
        ref.base_layer.bias.detach(),
        A[1],
        B[1],
        ref.scaling,
        dropout,
        True,
        torch.Generator().manual_seed(3),
    )
    assert torch.equal(y_q, y_r)
    dy = torch.randn(y_q.shape).to(dtype)
    y_q.backward(dy), y_r.backward(dy)
    for got, want in ((xs[0].grad, xs[1].grad), (A[0].grad, A[1].grad), (B[0].grad, B[1].grad)):
        assert torch.equal(got, want)


def test_qlora_triton_path_ignores_autocast():
    """precision bf16 runs the loop under autocast: the op's fp32 low-rank matmuls must stay fp32 (autocast
    would hand the kernel bf16 x A^T next to fp32 B), so under autocast it computes what it computes
    without."""
    q, _ = _lora_pair(torch.float32)
    x = torch.randn(2, 9, 96)
    args = (q.base_layer, q.lora_A.weight, q.lora_B.weight, q.scaling)
    want = qlora_linear(x, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = qlora_linear(x.clone().requires_grad_(True), *args)
    assert torch.equal(got, want)
    got.sum().backward()


# ----------------------------------------------------------------------------------------------------------
# The model: loading, freezing, PEFT


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora") / "base"
    write_checkpoint(d, "qwen2_tied", dtype=torch.bfloat16)
    return d


def test_only_the_adapters_train_and_the_nf4_base_is_untouched(base_dir):
    model = load_qlora_model(base_dir, LoraConfig(r=4, alpha=8, dropout=0.0), compute_dtype=torch.float32)
    randomise_adapters(model)
    before = {n: b.clone() for n, b in model.named_buffers()}
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in lora_parameters(model)) > 0
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    assert not any(isinstance(b, nn.Parameter) for b in model.buffers())
    model.train()
    model.loss(IDS, IDS.roll(-1, 1)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW(lora_parameters(model), lr=0.1).step()
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    # all 7 linears of both layers are NF4; adapters on the default targets (all 7)
    assert len(nf4_layers(model)) == 14 and len(model.info.lora_targets) == 14
    model.eval()  # generation: bitsandbytes' no-gradient path, as the loop's samples run it
    with torch.no_grad():
        expected = model.logits(IDS[:, :4])[0, -1].argmax().item()
    assert greedy_nocache(model, IDS[0, :4].tolist(), 3, [])[0] == expected


def test_flops_per_token_counts_the_nf4_weights_as_lora_counts_its_base(base_dir):
    """The loop's MFU: QLoRA's NF4 weights are buffers, yet they are matmul weights like LoRA's base."""
    from fasttune.models.lora import apply_lora
    from fasttune.train.metrics import flops_per_token

    qlora = load_qlora_model(base_dir, LoraConfig(r=4), compute_dtype=torch.float32)
    lora = fasttune.load_model(base_dir)
    apply_lora(lora, LoraConfig(r=4))
    assert flops_per_token(qlora, 100.0, lora=True) == flops_per_token(lora, 100.0, lora=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_by_layer_load_equals_quantising_the_loaded_model(base_dir, dtype):
    ours = load_qlora_model(base_dir, LoraConfig(targets=("q_proj", "v_proj")), compute_dtype=dtype)
    full = fasttune.load_model(base_dir, dtype=dtype)
    for name, lin in full.named_modules():
        if isinstance(lin, nn.Linear) and name.startswith("model.layers."):
            want = NF4Linear.from_linear(lin)
            got = ours.get_submodule(name)
            got = got.base_layer if isinstance(got, QLoraLinear) else got
            assert isinstance(got, NF4Linear) and got.compute_dtype == dtype
            for key in ("weight", "absmax", "absmax2", "code2", "offset", "code"):
                assert torch.equal(getattr(got, key), getattr(want, key)), (name, key)
            assert (got.bias is None) == (lin.bias is None)
            if lin.bias is not None:
                assert torch.equal(got.bias, lin.bias)
    full_params = dict(full.named_parameters())
    for name, p in ours.named_parameters():
        if "lora_" not in name and "_proj" not in name:  # embedding, norms: loaded as they are
            assert p.dtype == dtype and torch.equal(p, full_params[name])
    assert ours.model.layers[0].self_attn.k_proj.__class__ is NF4Linear  # not a target: NF4, no adapter


def _hf_4bit(base_dir):
    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=q, device_map="cpu", dtype=torch.bfloat16
    )
    # Training mode: in eval mode bitsandbytes repacks CPU weights for an inference kernel that needs
    # out_features divisible by its tile (the tiny shapes here are not). No dropout in these configs.
    return model.train()


def test_same_nf4_weights_and_logits_as_transformers_load_in_4bit_with_the_peft_adapter(base_dir, tmp_path):
    """transformers' load_in_4bit (nf4, double quant, bf16 compute) + PEFT loading our adapter is the
    reference QLoRA stack: the packed weights are the same bytes and the logits match."""
    import peft

    ours = load_qlora_model(base_dir, LoraConfig(r=4, alpha=8, dropout=0.0), compute_dtype=torch.bfloat16)
    randomise_adapters(ours, std=0.05)
    save_adapter(ours, tmp_path / "adapter")
    ref = _hf_4bit(base_dir)
    ref_q = ref.model.layers[1].mlp.down_proj.weight
    ours_q = ours.model.layers[1].mlp.down_proj.base_layer
    assert torch.equal(ours_q.weight.flatten(), ref_q.flatten())
    assert torch.equal(ours_q.absmax, ref_q.quant_state.absmax)
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").train()
    with torch.no_grad():
        got, want = ours.logits(IDS).float(), ref(IDS).logits.float()
        base = ours.logits(IDS).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    with torch.no_grad():
        for p in lora_parameters(ours):  # without the adapter, the logits move by more than that
            p.zero_()
        assert (ours.logits(IDS).float() - base).abs().max() > 0.05 * want.abs().max()


def test_adapter_on_the_unquantised_base_in_peft_is_within_the_nf4_error(base_dir, tmp_path):
    """The adapter loads with PEFT onto the bf16 base; its logits differ from ours by about what NF4
    changes in the base alone, far less than what the adapter changes."""
    import peft

    ours = load_qlora_model(base_dir, LoraConfig(r=4, alpha=8, dropout=0.0), compute_dtype=torch.float32)
    with torch.no_grad():
        nf4_base = ours.logits(IDS)
    randomise_adapters(ours, std=0.3)
    save_adapter(ours, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        hf_base = hf(IDS).logits
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
        theirs, got = peft_model(IDS).logits, ours.logits(IDS)
    nf4_error = (nf4_base - hf_base).abs().max()
    adapter_effect = (got - nf4_base).abs().max()
    assert adapter_effect > 3 * nf4_error > 0
    assert (theirs - got).abs().max() <= 2 * nf4_error


def test_merge_into_base_equals_peft_merge_on_the_unquantised_base(base_dir, tmp_path):
    import peft

    ours = load_qlora_model(base_dir, LoraConfig(r=4, alpha=8, dropout=0.0), compute_dtype=torch.float32)
    randomise_adapters(ours, std=0.1)
    save_adapter(ours, tmp_path / "adapter")
    merge_into_base(base_dir, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_errors_come_before_any_weight_is_read(base_dir, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="match no linear layer"):
        load_qlora_model(base_dir, LoraConfig(targets=("qq_proj",)))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it looks like
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ConfigError, match=r"pip install bitsandbytes"):
        load_qlora_model(base_dir)
    with pytest.raises(ConfigError, match=r"method qlora needs bitsandbytes .*pip install bitsandbytes"):
        load_config(None, ["method=qlora", f"output_dir={tmp_path}"])


# ----------------------------------------------------------------------------------------------------------
# The loop


def test_a_few_qlora_steps_reduce_the_loss_and_export_a_peft_adapter(setup, tmp_path, capsys):
    import peft

    cfg = load_config(
        None,
        [
            f"model={setup / 'model'}",
            f"data.files=[{setup / 'data.jsonl'}]",
            f"output_dir={tmp_path}",
            "method=qlora",
            "precision=bf16",
            "device=cpu",
            "micro_batch_tokens=512",
            "max_seq_len=512",
            "data.system_prompt=none",
            "lr=1e-2",
            "warmup=0",
            "max_steps=10",
            "eval_every=1000",
            "save_every=1000",
            "lora.merge=true",
        ],
    )
    result = train.run(cfg)
    losses = result.losses
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32)
        before = base(ids).logits
        tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        torch.testing.assert_close(merged(ids).logits, tuned, rtol=1e-4, atol=1e-4)
    assert (tuned - before).abs().max() > 1e-3  # the adapter learned something
    # the merge reads the unquantised base fresh (not the NF4 copy trained on) and says so
    assert "(base + adapter in fp32, saved as float32)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Host memory while loading

_MEASURE = r"""
import sys, torch, bitsandbytes.functional
from fasttune.models.lora import LoraConfig
from fasttune.models.qlora import NF4Linear, load_qlora_model
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
# Fixed costs first (bitsandbytes loads its native library and torch its kernels at the first call):
# they are the process's, not the model's.
NF4Linear.from_linear(torch.nn.Linear(256, 64).to(torch.bfloat16)).dequantize()
base = rss("VmRSS:")
model = load_qlora_model(sys.argv[1], LoraConfig(r=8), compute_dtype=torch.bfloat16)
held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(held, rss("VmHWM:") - base)
"""


def test_loading_peaks_near_the_nf4_model_not_the_bf16_one(tmp_path, capsys):
    """A 56M-parameter random bf16 checkpoint (4 layers, H 1024, I 2816, vocab 4096): the peak host
    memory above the process's baseline while loading it as QLoRA stays near what the NF4 model holds,
    far under the 111 MB of bf16 weights."""
    from safetensors.torch import save_file

    hf = dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    cfg = fasttune.ModelConfig.from_hf(hf)
    with torch.device("meta"):
        meta = fasttune.CausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {
        n: torch.randn(p.shape, generator=g).mul_(0.02).to(torch.bfloat16)
        for n, p in meta.state_dict().items()
        if n != "lm_head.weight"
    }
    bf16_bytes = sum(t.numel() * 2 for t in tensors.values())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    (ckpt / "config.json").write_text(json.dumps(hf))
    del tensors
    # glibc's dynamic mmap threshold keeps freed multi-MB blocks in its heap, so the same load peaked
    # anywhere from 55 to 83 MiB over five runs; a fixed threshold measures the loader, not the heap (46).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ckpt)], capture_output=True, text=True, check=True, env=env
    )
    held, peak = map(int, out.stdout.split())
    with capsys.disabled():
        print(
            f"\nload_qlora_model(56M parameters, bf16 file, cpu): "
            f"bf16 weights {bf16_bytes / 2**20:.0f} MiB, QLoRA model {held / 2**20:.0f} MiB, "
            f"peak host memory above baseline {peak / 2**20:.0f} MiB "
            f"= {peak / bf16_bytes:.2f}x the bf16 weights"
        )
    layer = 1024 * 2816 * 2  # the largest linear in bf16: the staging buffer plus quantisation temporaries
    assert held < 0.35 * bf16_bytes and peak < held + 4 * layer and peak < 0.55 * bf16_bytes
