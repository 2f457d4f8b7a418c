"""The memory model behind `fasttune plan` and `fasttune run --dry-run`: bytes per GPU, by part.

Memory per GPU, by part, following what `fasttune run` (train/) allocates for each method and precision:

  weights     full, precision bf16: fp32 master weights (4 B) plus the bf16 copies autocast makes of every
              matmul weight, which autograd keeps from the forward to the backward (2 B); bf16-pure: 2 B;
              fp32: 4 B. lora: the frozen base in bf16 (fp32 with precision fp32). qlora: decoder linears
              in NF4, 0.516 B per weight (qlora.NF4_BYTES_PER_WEIGHT), the rest in bf16, plus one
              dequantised layer while it is used.
  adapters    LoRA's A and B in fp32 (4 B), plus their autocast bf16 copies with precision bf16.
  gradients   one per trainable parameter, in its dtype.
  optimizer   AdamW: two states per trainable parameter, in its dtype.
  activations what autograd saves per token in each decoder block (`activation_bytes`, derived from the
              model's code and checked against the saved tensors of the real model in tests/test_plan.py)
              x tokens x layers, plus one block's worth for the gradients of the block being
              differentiated. With activation checkpointing: each block's input (H values) x tokens x
              layers, plus a recomputed block and its gradients.
  loss        kernels=triton: the chunked linear + cross-entropy (ops/linear_cross_entropy.py) keeps
              grad_hidden [T, H] fp32, one chunk of logits (<= 512 MiB) and, when the head trains, an fp32
              [V, H] gradient. kernels=torch: the same chunking in PyTorch (chunked_loss.py): the head's
              input, a logsumexp per token, three fp32 chunks of logits (64 MiB each), the [V, H] gradient.
  overhead    the CUDA context, cuBLAS workspaces and Triton's kernels (0.75 GiB, assumed) and the caching
              allocator's fragmentation (5% of the rest, assumed).
Several processes (parallelize.py): FSDP2 divides weights, gradients and optimizer states by N and adds
what is gathered: the root (embedding, final norm, head) for the whole step, two blocks (the one computing
and the next, prefetched) in the compute dtype, and one block's unsharded gradients with their fp32 copy
for the reduce-scatter; with precision bf16 its mixed-precision policy replaces autocast (no bf16 weight
copies). cpu_offload moves the shards, gradients and optimizer states to host memory. DDP keeps a whole
replica; its gradients are its all-reduce buckets (gradient_as_bucket_view), so nothing is added.
"auto" picks DDP when weights + gradients + AdamW states take at most 60% of one GPU, else FSDP, as
train/strategy.py decides (the rule the run applies). A plan "fits" under 95% of the GPU's memory, is
"tight" up to 100%.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fasttune.errors import FasttuneError
from fasttune.models.chunked_loss import chunk_tokens
from fasttune.models.lora import LoraConfig, apply_lora
from fasttune.models.model import CausalLM, ModelConfig
from fasttune.models.qlora import NF4_BYTES_PER_WEIGHT
from fasttune.train.strategy import decide_strategy

GIB = 2**30
CUDA_CONTEXT_BYTES = 0.75 * GIB  # context, cuBLAS workspaces, Triton's loaded kernels: assumed
ALLOCATOR_SHARE = 0.05  # caching allocator fragmentation: assumed
LCE_CHUNK_BYTES = 512 * 2**20  # as ops/linear_cross_entropy._CHUNK_BYTES (tests check they agree)


@dataclass
class Options:
    method: str = "full"
    precision: str = "bf16"  # bf16 | bf16-pure | fp32, as the run config
    micro_batch_tokens: int = 16384  # per forward/backward, per GPU
    tokens_per_step: int | None = None  # per optimizer step, all GPUs; None: one micro-batch per GPU
    seq_len: float = 2048.0  # mean tokens per document (attention FLOPs)
    activation_checkpointing: bool = False
    compile: bool = False
    kernels: str = "triton"  # triton | torch
    attention: str = "sdpa"  # sdpa (PyTorch) | flash (flash-attn installed)
    nproc: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (several processes)
    cpu_offload: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    device: str = "cuda"  # where dropout masks are bytes (cuda) or fp32 noise (cpu): tests measure on the CPU


@dataclass
class Shape:
    """Parameter counts of a model, from its structure on the meta device."""

    name: str
    config: ModelConfig
    total: int
    linear: int  # decoder linear weights (what QLoRA quantises)
    largest_linear: int
    block: int  # one decoder layer's parameters
    root: int  # embedding, final norm and an untied head
    lora: int  # adapter parameters for the Options' LoRA config
    lora_block: int
    matmul: int  # metrics.matmul_parameters

    @classmethod
    def of(cls, config: ModelConfig, lora: LoraConfig, name: str) -> Shape:
        from fasttune.train.metrics import matmul_parameters

        with torch.device("meta"):
            model = CausalLM(config)
        linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
        total, block = model.num_parameters(), sum(p.numel() for p in model.model.layers[0].parameters())
        matmul = matmul_parameters(model)
        apply_lora(model, lora)
        lora_n = sum(p.numel() for p in model.parameters()) - total
        return cls(
            name,
            config,
            total,
            sum(m.weight.numel() for m in linears),
            max(m.weight.numel() for m in linears),
            block,
            total - config.num_hidden_layers * block,
            lora_n,
            lora_n // config.num_hidden_layers,
            matmul,
        )


# ----------------------------------------------------------------------------------------------------------
# Activations and the loss


def _trains_base(o: Options) -> bool:
    return o.method == "full"


def _fp32_weights_under_autocast(o: Options, strategy: str) -> bool:
    """Full fine-tune, precision bf16, not FSDP: fp32 weights and activations cast by autocast."""
    return o.method == "full" and o.precision == "bf16" and strategy != "fsdp"


def activation_bytes(shape: Shape, o: Options, strategy: str = "single") -> float:
    """Bytes that autograd saves per token in one decoder block (after the first), by tensor:

    a: activation bytes (4 with precision fp32, else 2); r: the residual stream's (4 on the PyTorch path of
    a full bf16 fine-tune, whose fp32 embedding and weights make it fp32; else a; the fused Triton norm
    returns it in the attention output's dtype). Q = n_q hd, K = n_kv hd.
      norms (x2)   triton: the input h (r H) + rstd (4); torch: an fp32 copy (4 H) + rstd (4), and when
                   the norm weight trains its normalised input (a H; 4 H under autocast over fp32 weights)
      q/k/v, gate/up inputs  full fine-tune only (a frozen base needs no weight gradient): one a H copy
                   each, or under autocast over fp32 weights one bf16 cast per linear (3 and 2)
      attention    q (a Q), k and v (a K each; sdpa repeats them to n_q heads for GQA: a Q each), the
                   output (a Q, which o_proj reads in place), logsumexp (4 n_q); the sdpa path also
                   concatenates the packed sequences' outputs, a copy (a Q) that o_proj keeps when its
                   weight trains or its Triton LoRA op saves its input
      q/k norms    (Qwen3) triton: a (Q + K) + 4 (n_q + n_kv); torch: 4 (Q + K) + 4 (n_q + n_kv), plus
                   a (Q + K) when their weights train
      MLP          triton: gate and up (2 a I; SiLU is recomputed); torch: gate, up, silu(gate) (3 a I);
                   down's input (a I) when it trains
      LoRA         triton (ops/lora_linear.py, qlora.py): each distinct input once (a H for q/k/v and for
                   gate/up, a I for down; o's is the attention output) + 4 r per adapter (x A^T in fp32)
                   + a bool keep-mask (1 B per input element) per adapter with dropout; torch (LoraLinear):
                   per adapter an fp32 copy of its input (4 per element; under autocast the bf16 cast, 2)
                   and x A^T (4 r; 2 r under autocast), plus dropout's mask (CUDA: 1 B; CPU: fp32 noise)
    """
    c = shape.config
    H, I = c.hidden_size, c.intermediate_size
    Q, K = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    nq, nkv = c.num_attention_heads, c.num_key_value_heads
    a = 4 if o.precision == "fp32" else 2
    cast = _fp32_weights_under_autocast(o, strategy)
    full = _trains_base(o)
    triton = o.kernels == "triton"
    r = 4 if (cast and not triton) or o.precision == "fp32" else a
    norm_out = 4 if cast else a

    b = 0.0
    b += 2 * ((r * H + 4) if triton else (4 * H + 4 + (norm_out * H if full else 0)))
    if full:
        b += (3 + 2 if cast else 2) * a * H
    kv = a * Q if (o.attention == "sdpa" and nq != nkv) else a * K
    # sdpa concatenates the packed sequences' outputs: a copy, saved when o_proj keeps its input as it is
    o_saves_input = full or (triton and o.method != "full" and "o_proj" in o.lora.targets)
    b += a * Q + 2 * kv + a * Q + 4 * nq + (a * Q if o.attention == "sdpa" and o_saves_input else 0)
    if c.qk_norm:
        b += 4 * (nq + nkv) + ((a if triton else 4) * (Q + K)) + (a * (Q + K) if full and not triton else 0)
    b += (2 if triton else 3) * a * I + (a * I if full else 0)
    if o.method in ("lora", "qlora"):
        widths = {
            "q_proj": H,
            "k_proj": H,
            "v_proj": H,
            "o_proj": Q,
            "gate_proj": H,
            "up_proj": H,
            "down_proj": I,
        }
        targets = [t for t in o.lora.targets if t in widths]
        autocast = o.precision == "bf16"
        p = o.lora.dropout > 0
        if triton:
            inputs = {"h": H} if {"q_proj", "k_proj", "v_proj"} & set(targets) else {}
            if {"gate_proj", "up_proj"} & set(targets):
                inputs["h2"] = H
            if "down_proj" in targets:
                inputs["down"] = I
            b += a * sum(inputs.values()) + len(targets) * 4 * o.lora.r
            b += sum(widths[t] for t in targets) * (1 if p else 0)
        else:
            mask = (1 if o.device == "cuda" else 4) if p else 0
            copy = 2 if autocast else 4
            b += sum(widths[t] * (copy + mask) for t in targets) + len(targets) * copy * o.lora.r
    return b


def _chunk_tokens(T: int, V: int, itemsize: int) -> int:
    """ops/linear_cross_entropy._auto_chunk_size: the tokens whose [C, V] logits fit in 512 MiB."""
    c = LCE_CHUNK_BYTES // (V * itemsize) // 256 * 256
    return max(1, min(max(c, 256), T))


def loss_bytes(shape: Shape, o: Options, T: int, strategy: str = "single") -> float:
    """The final norm, the head and the loss, for a micro-batch of T tokens (see the module docstring)."""
    c = shape.config
    H, V = c.hidden_size, c.vocab_size
    a = 4 if o.precision == "fp32" else 2
    cast = _fp32_weights_under_autocast(o, strategy)
    full = _trains_base(o)
    if o.kernels == "triton":
        r = 4 if o.precision == "fp32" else a
        per_token = r * H + 4 + 4 * H  # final norm's saved input and rstd; grad_hidden in fp32
        const = _chunk_tokens(T, V, a) * V * a
        const += (4 * V * H if full else 0) + (2 * V * H if cast else 0)  # fp32 grad_weight; bf16 weight copy
        return T * per_token + const
    # kernels=torch: chunked_loss.py keeps the head's input (a H; recomputing the logits needs it) and
    # each token's logsumexp (4), and has about three [C, V] fp32 buffers of one chunk alive at once; the
    # head's fp32 gradient [V, H] when it trains, its autocast copy (2 V H) over fp32 weights.
    norm_out = 4 if cast else a
    per_token = 4 * H + 4 + (norm_out * H if full else 0) + a * H + 4
    const = 3 * min(chunk_tokens(V), T) * V * 4 + (4 * V * H if full else 0) + (2 * V * H if cast else 0)
    return T * per_token + const


@dataclass
class Row:
    part: str
    bytes: float
    note: str


def training_state_bytes(shape: Shape, o: Options) -> float:
    """Weights + gradients + AdamW states unsharded (parallelize.training_state_bytes, from counts)."""
    if o.method == "full":
        w = 2 if o.precision == "bf16-pure" else 4
        return shape.total * 4 * w  # weight, gradient, two AdamW states
    base = 4 if o.precision == "fp32" else 2
    return shape.total * base + shape.lora * 4 * 4


def choose_strategy(shape: Shape, o: Options, gpu_bytes: float) -> str:
    if o.nproc <= 1:
        return "single"
    if o.method == "qlora":
        raise FasttuneError("method qlora runs in one process: plan it with --nproc 1")
    device_type = "cuda" if o.device.startswith("cuda") else o.device
    return decide_strategy(o.strategy, o.nproc, device_type, training_state_bytes(shape, o), gpu_bytes)[0]


def memory_rows(shape: Shape, o: Options, strategy: str) -> tuple[list[Row], float]:
    """(rows of bytes per GPU, host bytes per process) for this strategy."""
    c = shape.config
    L, H, V = c.num_hidden_layers, c.hidden_size, c.vocab_size
    N = o.nproc if strategy == "fsdp" else 1
    comp = 4 if o.precision == "fp32" else 2
    cast = _fp32_weights_under_autocast(o, strategy)
    rows: list[Row] = []
    head = V * H if (o.kernels == "torch" and cast) else 0  # the head's autocast copy (triton: in the loss)
    if o.method == "full":
        store = 2 if o.precision == "bf16-pure" else 4
        weights, note = shape.total * store, f"{store} B per parameter"
        if cast:
            weights += 2 * (shape.linear + head)
            note += " (fp32 master) + bf16 autocast copies of the matmul weights, kept for the backward"
        grads, opt, trainable = shape.total * store, shape.total * 2 * store, shape.total
        adapters = 0.0
    else:
        trainable = shape.lora
        if o.method == "lora":
            base = 4 if o.precision == "fp32" else 2
            weights, note = shape.total * base, f"frozen base, {base} B per parameter"
        else:
            weights = shape.linear * NF4_BYTES_PER_WEIGHT + (shape.total - shape.linear) * comp
            weights += shape.largest_linear * comp
            note = (
                f"decoder linears in NF4 ({NF4_BYTES_PER_WEIGHT:.3f} B/weight), "
                f"{(shape.total - shape.linear) / 1e6:.0f}M parameters in {'fp32' if comp == 4 else 'bf16'}, "
                "one dequantised layer"
            )
        adapters = shape.lora * (4 + (2 if o.precision == "bf16" and strategy != "fsdp" else 0))
        grads, opt = shape.lora * 4, shape.lora * 8
    host = 0.0
    grad_note = f"{trainable / 1e6:.1f}M trainable parameters"
    opt_note = "AdamW: 2 states per trainable parameter, in its dtype"
    if strategy == "fsdp":
        gathered = (shape.root + 2 * shape.block) * comp
        block_grads = (shape.block if o.method == "full" else shape.lora_block) * (comp + 4)
        shards = (weights + adapters + grads + opt) / N
        if o.cpu_offload:
            host = shards
            weights, adapters, grads, opt = 0.0, 0.0, 0.0, 0.0
            note = "shards on the host (cpu_offload)"
        else:
            weights, adapters, grads, opt = weights / N, adapters / N, grads / N, opt / N
            note += f", sharded over {N}"
        rows.append(Row("weights", weights, note))
        rows.append(
            Row(
                "fsdp gathered", gathered + block_grads, "root + 2 blocks in compute dtype; one block's grads"
            )
        )
    else:
        rows.append(Row("weights", weights, note))
    where = ", on the host (cpu_offload)" if N > 1 and o.cpu_offload else ", sharded" if N > 1 else ""
    if o.method != "full":
        rows.append(Row("adapters", adapters, "LoRA A and B in fp32" + where))
    rows.append(Row("gradients", grads, grad_note + where))
    rows.append(Row("optimizer", opt, opt_note + where))

    T = o.micro_batch_tokens
    per = activation_bytes(shape, o, strategy)
    if o.activation_checkpointing:
        r = 4 if (cast and o.kernels == "torch") or o.precision == "fp32" else 2
        act = L * T * r * H + 2 * T * per
        act_note = f"{T:,} tokens x {L} block inputs ({r * H:,} B) + 1 block recomputed and its gradients"
    else:
        act = (L + 1) * T * per
        act_note = f"{T:,} tokens x ({L} + 1) blocks x {per / 1024:.1f} KiB per token"
    rows.append(Row("activations", act, act_note))
    loss_note = (
        "chunked linear + cross-entropy" if o.kernels == "triton" else "chunked cross-entropy (PyTorch)"
    )
    rows.append(Row("loss", loss_bytes(shape, o, T, strategy), loss_note))
    rest = sum(r.bytes for r in rows)
    rows.append(
        Row(
            "overhead",
            CUDA_CONTEXT_BYTES + ALLOCATOR_SHARE * rest,
            "CUDA context 0.75 GiB + 5% allocator fragmentation (assumed)",
        )
    )
    return rows, host
