"""QLoRA: a frozen base quantised to NF4 with bitsandbytes, fp32 LoRA adapters on top, a PEFT adapter out.

The storage (Dettmers et al. 2023, "QLoRA"). Every linear layer of the decoder blocks is stored as NF4: 4
bits per weight (two per byte), one absmax scale per block of 64 weights, and those scales themselves
quantised to 8 bits in blocks of 256 with one fp32 scale each ("double quantisation"):

    bytes per weight = 1/2 + 1/64 + 4 / (64 * 256) = 0.51587

The embedding, the head, the norms and the biases stay in the compute dtype (bf16 by default), as PEFT and
transformers' `load_in_4bit` leave them. Adapters go on the `lora.targets` linears only; the other decoder
linears are NF4 without adapters. A and B are fp32 and train exactly as in `fasttune.models.lora` (QLoraLinear
is a LoraLinear whose base layer is an `NF4Linear`), so `save_adapter` writes the same PEFT folder.

The forward. A 4-bit weight cannot feed a GEMM directly: the weight is dequantised to the compute dtype
and multiplied. bitsandbytes does the same for training-sized inputs (its fused 4-bit GEMM kernel runs
only up to 1,536 rows on CUDA; beyond that `matmul_4bit` dequantises and calls F.linear), so the choice
is only where the dequantised W lives:
  - kernels="torch": `bnb.matmul_4bit(x, W_nf4)` plus LoraLinear's fp32 adapter path. bitsandbytes'
    autograd function dequantises W in the forward, frees it, and dequantises again for dx.
  - kernels="triton": `QLoraLinearFunction` dequantises W to the compute dtype, feeds it to the fused LoRA
    GEMM of `ops/lora_linear.py` (x W^T + s (x A^T) B^T in one accumulator), frees it, and in the backward
    dequantises again for dx = dy W + s (dy B) A through the same kernel. W is never saved for the
    backward: saving it would hold a bf16 copy of every layer, the whole model, until the backward.
Both paths hold one dequantised layer at a time (the largest, gate/up of Qwen2.5-7B, is 136 MB in bf16).
Dequantising reads 0.52 bytes and writes 2 bytes per weight, which the GEMM reads back, against 2 x tokens
FLOPs per weight: at 16k tokens per micro-batch that traffic is ~2% of the GEMM's time at an RTX 4090's
165 TFLOP/s and 1 TB/s (an estimate). Measured on the CPU (2 cores, bf16, a 4864 x 896 layer, 512
tokens): matmul_4bit 24.5 ms, dequantise + matmul 25.0 ms, dequantise alone 0.6 ms. What a GPU should
check: the dequantise time against the GEMM at 16k tokens, and that peak memory stays at the NF4 model
plus one layer.

Loading (`load_qlora_model`). The checkpoint is validated without reading a weight (weights.py's
`check_checkpoint`), the model is built on the meta device, and each tensor is then copied from the
safetensors memory map into a buffer of the compute dtype on the target device; decoder linear weights are
quantised at once (their buffer is reused for the next). Neither host nor GPU ever holds the whole bf16
model: the peak is the NF4 model plus the unquantised parts plus one layer in bf16 and the quantisation's
temporaries. Measured on the CPU (tests/test_qlora.py: 56M parameters, 106 MiB in bf16): the QLoRA model
holds 36 MiB and the load peaks 46-48 MiB above the process's baseline, 0.44x the bf16 weights.

Merging (`merge_into_base`). The adapter was trained against the NF4 weights, but it is merged into the
original bf16 weights read fresh from the checkpoint: W + s B A, which is what loading the adapter with
PEFT onto the unquantised base computes, and the form in which the adapter is published. It differs from
the trained model by the quantisation error of W, as every QLoRA merge does.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from fasttune.errors import ConfigError
from fasttune.models.lora import LoraConfig, LoraLinear, _find_targets
from fasttune.models.model import CausalLM
from fasttune.models.weights import (
    _read_generation_config,
    _set_parameter,
    check_checkpoint,
    read_tensors,
    save_model,
)

log = logging.getLogger("fasttune")

BLOCKSIZE = 64  # weights per absmax scale (QLoRA's choice)
NESTED_BLOCKSIZE = 256  # 8-bit absmax scales per fp32 scale (double quantisation)
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / BLOCKSIZE + 4 / (BLOCKSIZE * NESTED_BLOCKSIZE)
# Elements per bitsandbytes quantize call on the CPU: a multiple of 64 (whole blocks, an even count).
# Its CPU path makes ~24 bytes of temporaries per element: ~6 MB per call here, where one call per layer
# would take 1.6 GB for one 7B MLP matrix (and glibc kept such blocks: loading 111M parameters peaked
# 155 MiB above the baseline with 2^20-element calls, 81 MiB with 2^18). On CUDA one call per layer:
# the kernel needs no temporaries to speak of.
QUANTIZE_CHUNK = 1 << 18
INSTALL_HINT = "pip install bitsandbytes (or pip install 'fasttune[qlora]')"
# The quantisation statistics, kept in fp32 whatever the model is cast to (see NF4Linear._apply).
_STATS = ("absmax2", "code2", "offset", "code")


def bitsandbytes_missing() -> str | None:
    """None when bitsandbytes can be imported, else why not; found without importing it."""
    try:
        spec = importlib.util.find_spec("bitsandbytes")
    except (ImportError, ValueError) as e:  # ValueError: sys.modules holds None or a module without a spec
        return f"cannot be imported: {e}"
    return None if spec is not None else "not installed"


def bnb_functional():
    """bitsandbytes.functional, or a ConfigError that says how to install it."""
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as e:
        raise ConfigError(
            f"method qlora needs bitsandbytes, which is not installed ({e}): {INSTALL_HINT}"
        ) from None
    return bnb_f


def quantize_nf4_blocks(w: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
    """NF4 codes of w (flattened, row-major) in blocks of 64: packed uint8 [(n + 1) // 2, 1], the fp32
    absmax per block and the 16 NF4 levels. On the CPU bitsandbytes is called on `chunk` elements at a
    time (a multiple of the block, so the blocks and bytes are exactly those of one call over the whole
    tensor): one call would make ~24 bytes of temporaries per element, 1.6 GB for one 7B MLP matrix."""
    bnb_f = bnb_functional()
    flat, n = w.reshape(-1), w.numel()
    chunk = chunk or (QUANTIZE_CHUNK if w.device.type == "cpu" else n)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // BLOCKSIZE), dtype=torch.float32, device=w.device)
    code = None
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        q, state = bnb_f.quantize_4bit(part, blocksize=BLOCKSIZE, compress_statistics=False, quant_type="nf4")
        packed[start // 2 : start // 2 + q.shape[0]] = q.view(-1, 1)
        absmax[start // BLOCKSIZE : start // BLOCKSIZE + state.absmax.numel()] = state.absmax
        code = state.code
    return packed, absmax, code


class NF4Linear(nn.Module):
    """A frozen linear layer y = x W^T + b whose W [out, in] is stored as NF4 with double quantisation.

    Buffers: `weight` (uint8, two 4-bit codes per byte, [(out * in + 1) // 2, 1] as bitsandbytes packs
    it), `absmax` (uint8, one per 64 weights), `absmax2` (fp32, one per 256 absmax values), `code2` (the
    256-entry fp32 map of the 8-bit absmax codes), `offset` (fp32, the mean absmax subtracted before they
    were quantised) and `code` (the 16 NF4 levels). `bias` is a frozen Parameter in the compute dtype.
    Buffers, not Parameters: the optimizer, gradient clipping and FSDP never see them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        for name, dt in (("weight", torch.uint8), ("absmax", torch.uint8)):
            self.register_buffer(name, torch.empty(0, dtype=dt, device=device))
        for name in _STATS:
            self.register_buffer(name, torch.empty(0, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.kernels = "torch"  # set by CausalLM.set_kernels; this layer runs the same either way

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantise an existing linear layer (its weight cast to `dtype`, default its own dtype)."""
        dtype = dtype or linear.weight.dtype
        device = linear.weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device, dtype)
        layer.quantize_(linear.weight.detach().to(dtype))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(dtype).clone(), requires_grad=False)
        return layer

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> None:
        """Store W [out, in] (in the compute dtype, on the layer's device) as NF4."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"NF4Linear: weight {tuple(w.shape)} is not ({self.out_features}, {self.in_features})"
            )
        bnb_f = bnb_functional()
        packed, absmax, code = quantize_nf4_blocks(w)
        # Double quantisation, as bitsandbytes' quantize_4bit(compress_statistics=True) does it: the
        # absmax values minus their mean, in 8-bit blocks of 256.
        offset = absmax.mean()
        qabsmax, nested = bnb_f.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        self.weight, self.absmax = packed, qabsmax
        self.absmax2, self.code2 = nested.absmax.float(), nested.code.float()
        self.offset, self.code = offset.float().reshape(()), code.float()
        self.compute_dtype = w.dtype

    def quant_state(self):
        """A bitsandbytes QuantState over this layer's buffers (a light object, built per call, so the
        buffers stay the one copy that `.to()` moves and `state_dict()` sees)."""
        bnb_f = bnb_functional()
        nested = bnb_f.QuantState(
            absmax=self.absmax2, code=self.code2, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
        return bnb_f.QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.code,
            blocksize=BLOCKSIZE,
            quant_type="nf4",
            dtype=self.compute_dtype,
            offset=self.offset,
            state2=nested,
        )

    @property
    def nf4_weight_numel(self) -> int:
        """The weights this layer stands for (metrics.matmul_parameters counts them for FLOPs and MFU)."""
        return self.in_features * self.out_features

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in the compute dtype: a new tensor, freed by the caller."""
        return bnb_functional().dequantize_4bit(self.weight, self.quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight.t(), quant_state=self.quant_state(), bias=self.bias)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) casts every floating buffer; the fp32 scales must not be rounded (the NF4 codes
        # are only as good as their scales). They follow the device and keep their dtype.
        stats = {k: getattr(self, k) for k in _STATS}
        super()._apply(fn, recurse)
        for k, v in stats.items():
            setattr(self, k, v.to(self.weight.device))
        return self

    def extra_repr(self) -> str:
        dtype = str(self.compute_dtype).replace("torch.", "")
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute {dtype}"


# ----------------------------------------------------------------------------------------------------------
# The adapted layer


class QLoraLinearFunction(torch.autograd.Function):
    """`LoraLinearFunction` (ops/lora_linear.py) with W dequantised from NF4 on the fly, in the forward
    and again in the backward: y = x W^T + b + s * xa B^T, xa = xd A^T, xd = x * m / (1 - p).

    Backward, with g = dy B: dx = dy W + m / (1 - p) * s (g A) (the fused kernel), dA = s g^T xd,
    dB = s dy^T xa. Saved: x, the keep-mask, xa and the NF4 layer (a reference, not a copy of W)."""

    @staticmethod
    def forward(ctx, x2, base, bias, lora_A, lora_B, scaling, mask2, dropout_p):
        from fasttune.ops.lora_linear import lora_forward

        y, xa = lora_forward(x2, base.dequantize(), bias, lora_A, lora_B, scaling, mask2, dropout_p)
        ctx.base = base  # the dequantised W is freed here and made again in the backward
        ctx.save_for_backward(x2, lora_A, lora_B, xa, mask2)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return y

    @staticmethod
    def backward(ctx, dy):
        from fasttune.ops.lora_linear import lora_backward

        x2, lora_A, lora_B, xa, mask2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dA, dB = lora_backward(
            dy,
            x2,
            ctx.base.dequantize,
            lora_A,
            lora_B,
            xa,
            mask2,
            ctx.scaling,
            ctx.dropout_p,
            needs[0],
            needs[3],
            needs[4],
        )
        return dx, None, None, dA, dB, None, None, None


def qlora_linear(
    x: torch.Tensor,
    base: NF4Linear,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The Triton path of `QLoraLinear`: x [..., in] in the compute dtype; A [r, in], B [out, r] fp32."""
    from fasttune.ops import check_triton
    from fasttune.ops.lora_linear import lora_dropout_mask

    check_triton(x, base.weight, lora_A, lora_B, op="qlora_linear")
    if x.dtype != base.compute_dtype:
        raise ValueError(
            f"qlora_linear: x is {x.dtype} but the NF4 weight dequantises to {base.compute_dtype}"
        )
    if lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32:
        raise ValueError(f"qlora_linear: lora_A and lora_B must be fp32, got {lora_A.dtype}, {lora_B.dtype}")
    mask = lora_dropout_mask(x.shape, dropout_p, x.device, generator) if training and dropout_p > 0 else None
    x2 = x.reshape(-1, base.in_features)
    mask2 = mask.reshape(-1, base.in_features) if mask is not None else None
    y = QLoraLinearFunction.apply(
        x2, base, base.bias, lora_A, lora_B, float(scaling), mask2, float(dropout_p)
    )
    return y.view(*x.shape[:-1], base.out_features)


class QLoraLinear(LoraLinear):
    """A LoraLinear whose frozen base is an `NF4Linear`: same adapters, same PEFT keys, same math with W
    replaced by its NF4 dequantisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return qlora_linear(
                x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling, p, self.training
            )
        return super().forward(x)  # bnb.matmul_4bit for the base (NF4Linear.forward), then the adapters

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """dequant(W) + s * B @ A in fp32 (the model as trained; `merge_into_base` merges into W itself)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return self.base_layer.dequantize().float() + self.scaling * delta


# ----------------------------------------------------------------------------------------------------------
# Loading, and the run's model


def _decoder_linears(model: CausalLM) -> dict[str, nn.Linear]:
    return {
        name: m
        for name, m in model.model.layers.named_modules(prefix="model.layers")
        if isinstance(m, nn.Linear)
    }


def load_qlora_model(
    path: str | os.PathLike,
    lora_cfg: LoraConfig | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.bfloat16,
    kernels: str = "auto",
) -> CausalLM:
    """A checkpoint folder as a QLoRA model on `device`: decoder linears in NF4 (quantised one at a time as
    they are read), everything else in `compute_dtype`, fp32 adapters on `lora_cfg.targets`, every other
    parameter frozen. Returned in eval mode, as `load_model` returns. Errors (bitsandbytes missing, bad
    checkpoint, unknown targets) come before any weight is read."""
    bnb_functional()
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"load_qlora_model: compute_dtype must be bf16, fp16 or fp32, got {compute_dtype}")
    cfg = lora_cfg or LoraConfig()
    plan = check_checkpoint(path)
    model, device = plan.meta_model, torch.device(device)
    targets = _find_targets(model, cfg.targets)  # checked before anything is read
    linears = _decoder_linears(model)
    for name, lin in linears.items():
        parent, _, attr = name.rpartition(".")
        nf4 = NF4Linear(lin.in_features, lin.out_features, lin.bias is not None, "meta", compute_dtype)
        setattr(model.get_submodule(parent), attr, nf4)

    # One staging buffer, the size of the largest linear, takes each weight before it is quantised: one
    # layer in the compute dtype is all the unquantised model ever held, and no allocator is asked for a
    # new layer-sized block per layer (glibc kept those: 5.5 MB of RSS per 2.9M-weight layer on the CPU).
    quantised = {f"{name}.weight" for name in linears}
    staging = torch.empty(max(m.weight.numel() for m in linears.values()), dtype=compute_dtype, device=device)

    def out_for(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in quantised:
            return staging[: math.prod(shape)].view(shape)
        return torch.empty(shape, dtype=compute_dtype, device=device)

    for name, out in read_tensors(plan, out_for):
        if name in quantised:
            model.get_submodule(name.rpartition(".")[0]).quantize_(out)
        else:
            _set_parameter(model, name, out)
    out = staging = None  # free the buffer (the loop's last tensor may be a view of it)
    model.tie_weights()
    model.model.inv_freq = model.model.inv_freq.to(device)
    model.info.source_path = str(plan.folder)
    model.info.generation_config = _read_generation_config(plan.folder)

    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent, _, attr = name.rpartition(".")
        adapter = QLoraLinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout)
        setattr(model.get_submodule(parent), attr, adapter)
    model.info.lora_config = cfg
    model.info.lora_targets = sorted(targets)
    from fasttune.models.kernels import apply_kernels

    apply_kernels(model, kernels, device)
    model.eval()
    nf4_bytes = sum(m.weight.numel() + m.absmax.numel() + 4 * m.absmax2.numel() for m in nf4_layers(model))
    log.info(
        "loaded %s as QLoRA: %d linears in NF4 (%.2f GiB), the rest in %s; r=%d alpha=%g on %d modules",
        plan.folder,
        len(linears),
        nf4_bytes / 2**30,
        str(compute_dtype).replace("torch.", ""),
        cfg.r,
        cfg.alpha,
        len(targets),
    )
    return model


def nf4_layers(model: nn.Module) -> list[NF4Linear]:
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


def build_for_run(cfg, tokenizer, device: torch.device, out: Path) -> CausalLM:
    """The model of a `method: qlora` run: NF4 in bf16 compute (fp32 with precision fp32). The built-in
    tiny model is saved first as out/base_model (the adapter needs its base) and loaded from there."""
    path = cfg.model
    if path is None:
        from fasttune.models import builtin

        base = builtin.tiny_model(tokenizer, cfg.seed)
        save_model(base, out / "base_model", tokenizer=tokenizer)
        del base
        path = out / "base_model"
    compute = torch.float32 if cfg.precision == "fp32" else torch.bfloat16
    lora_cfg = cfg.lora.to_lora_config()
    return load_qlora_model(path, lora_cfg, device, compute_dtype=compute, kernels=cfg.kernels)


def merge_into_base(
    base_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Merge a (Q)LoRA adapter into the unquantised base read fresh from `base_path` (W + s B A in fp32,
    cast to `dtype`, default the checkpoint's), and save a Hugging Face folder. Host memory: the base
    model in `dtype` (or fp32, see fasttune.models.merge), on the CPU. The one merge path: merge_to_folder."""
    from fasttune.models.merge import merge_to_folder

    return merge_to_folder(base_path, adapter_path, out, tokenizer=tokenizer, dtype=dtype)
