"""The planner: named shapes against their published parameter counts, the activation formula against the
tensors autograd really saves in fasttune's model, hand-computed plans (Qwen2.5-0.5B full on an RTX 4090,
Qwen2.5-7B QLoRA, FSDP over 8 GPUs), fits / does not fit, the time per epoch, measured MFUs, the CLI and
`fasttune run --dry-run`."""

import contextlib
import json
import math

import pytest
import torch

from fasttune.cli.main import main
from fasttune.models.kernels import apply_kernels
from fasttune.models.lora import LoraConfig, apply_lora
from fasttune.models.model import CausalLM, ModelConfig
from fasttune.models.qlora import NF4_BYTES_PER_WEIGHT
from fasttune.plan.estimate import (
    ASSUMED_MFU,
    Options,
    Shape,
    make_plan,
    measured_mfu,
    resolve_gpu,
    resolve_model,
)
from fasttune.plan.memory import CUDA_CONTEXT_BYTES, activation_bytes, training_state_bytes
from fasttune.plan.tables import GPUS, SHAPES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
GIB = 2**30


def shape(name, lora=None):
    config, name = resolve_model(name)
    return Shape.of(config, lora or LoraConfig(), name)


def rows(plan):
    return {r.part: r.bytes for r in plan.rows}


# ----------------------------------------------------------------------------------------------------------
# Shapes


def test_named_shapes_have_the_published_parameter_counts():
    """Totals (embeddings included, a tied head once) as the model cards give them; Qwen2.5-0.5B exactly as
    docs/ARCHITECTURE.md; Qwen2.5-7B, Llama-3.1-8B and Mistral-7B as their safetensors hold them."""
    exact = {
        "qwen2.5-0.5b": 494_032_768,
        "qwen2.5-7b": 7_615_616_512,
        "llama-3.1-8b": 8_030_261_248,
        "mistral-7b": 7_241_732_096,
        "qwen3-0.6b": 596_049_920,
    }
    cards = {"qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9, "qwen2.5-14b": 14.7e9, "qwen3-1.7b": 1.7e9}
    cards |= {"qwen3-4b": 4.0e9, "qwen3-8b": 8.2e9}
    assert set(exact) | set(cards) == set(SHAPES)
    for name, n in exact.items():
        assert shape(name).total == n, name
    for name, n in cards.items():
        assert shape(name).total == pytest.approx(n, rel=0.015), name


def test_a_model_folder_plans_from_its_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["qwen2.5-0.5b"]))
    config, name = resolve_model(str(tmp_path))
    assert Shape.of(config, LoraConfig(), name).total == 494_032_768
    assert main(["plan", "--model", "no-such-model"]) == 2


# ----------------------------------------------------------------------------------------------------------
# Activations: the formula against what autograd saves


def _tiny(layers, qk_norm):
    hf = dict(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4)
    hf |= dict(num_hidden_layers=layers, num_key_value_heads=2, tie_word_embeddings=True)
    if qk_norm:
        hf |= dict(model_type="qwen3", head_dim=24)
    return ModelConfig.from_hf(hf)


def _model(o: Options, layers: int, qk_norm: bool, tmp_path):
    torch.manual_seed(0)
    if o.method == "qlora":
        from fasttune.models.qlora import load_qlora_model
        from fasttune.models.weights import save_model

        folder = tmp_path / f"tiny-{layers}-{qk_norm}"
        if not folder.exists():
            save_model(CausalLM(_tiny(layers, qk_norm)), folder)
        dtype = torch.float32 if o.precision == "fp32" else torch.bfloat16
        return load_qlora_model(folder, o.lora, compute_dtype=dtype, kernels=o.kernels)
    model = CausalLM(_tiny(layers, qk_norm))
    if o.precision == "bf16-pure" or (o.method != "full" and o.precision != "fp32"):
        model = model.to(torch.bfloat16)
    if o.method == "lora":
        apply_lora(model, o.lora)
    apply_kernels(model, o.kernels, torch.device("cpu"))
    return model


def _saved_bytes(model, T, o: Options) -> int:
    """Bytes of the distinct storages autograd saves in a forward over one packed row of two sequences,
    parameters excluded."""
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 320, (1, T), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, T // 2, T], dtype=torch.int32)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if o.precision == "bf16" else contextlib.nullcontext()
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(ids, cu_seqlens=cu, max_seqlen=T // 2)
    return sum(seen.values())


CASES = [  # method, precision, kernels, LoRA dropout, LoRA targets (None: all seven), Qwen3's q/k norms
    ("full", "bf16", "torch", 0.0, None, False),
    ("full", "bf16", "torch", 0.0, None, True),
    ("full", "bf16-pure", "torch", 0.0, None, False),
    ("full", "fp32", "torch", 0.0, None, False),
    ("full", "bf16", "triton", 0.0, None, False),
    ("full", "bf16-pure", "triton", 0.0, None, True),
    ("full", "fp32", "triton", 0.0, None, False),
    ("lora", "bf16", "torch", 0.1, None, False),
    ("lora", "bf16", "torch", 0.0, None, True),
    ("lora", "bf16-pure", "torch", 0.1, ("q_proj", "v_proj"), False),
    ("lora", "bf16-pure", "triton", 0.1, None, False),
    ("lora", "bf16-pure", "triton", 0.0, ("q_proj", "v_proj"), False),
    ("qlora", "bf16", "torch", 0.1, None, False),
    ("qlora", "bf16", "triton", 0.1, None, False),
    ("qlora", "bf16-pure", "triton", 0.0, ("o_proj", "down_proj"), False),
]


@pytest.mark.parametrize("method, precision, kernels, dropout, targets, qk_norm", CASES)
def test_activation_formula_equals_what_autograd_saves(
    method, precision, kernels, dropout, targets, qk_norm, tmp_path
):
    """Per token and per block, from two depths and two lengths, so that what is not per block (the
    embedding, the loss, the RoPE tables) cancels out, and from blocks 2 and 3 (in block 1 of a frozen
    base nothing before the first adapter needs a gradient): plan_memory.activation_bytes, byte for
    byte. The SDPA path, as on the CPU; dropout noise as the CPU draws it (fp32; CUDA keeps bool masks)."""
    lora = LoraConfig(r=8, alpha=16, dropout=dropout, targets=targets or LoraConfig().targets)
    o = Options(
        method=method, precision=precision, kernels=kernels, attention="sdpa", lora=lora, device="cpu"
    )

    def per_token(layers):
        model = _model(o, layers, qk_norm, tmp_path)
        return (_saved_bytes(model, 32, o) - _saved_bytes(model, 16, o)) / 16

    measured = per_token(3) - per_token(2)
    assert activation_bytes(Shape.of(_tiny(2, qk_norm), lora, "tiny"), o) == measured


# ----------------------------------------------------------------------------------------------------------
# Plans computed by hand


def test_qwen25_05b_full_bf16_on_an_rtx4090_by_hand():
    """Full fine-tune, precision bf16 (fp32 master + autocast), 16,384 tokens, Triton kernels, SDPA."""
    P, H, I, V, L = 494_032_768, 896, 4864, 151_936, 24
    linear = L * (2 * 896 * 896 + 2 * 128 * 896 + 3 * 4864 * 896)  # q, o; k, v; gate, up, down
    assert linear == 357_826_560
    plan = make_plan(shape("qwen2.5-0.5b"), Options(micro_batch_tokens=16384), GPUS["rtx4090"])
    got = rows(plan)
    assert got["weights"] == 4 * P + 2 * linear  # fp32 master + the bf16 copies autocast keeps
    assert got["gradients"] == 4 * P and got["optimizer"] == 8 * P
    # Per token per block: norms 2 x (2H + 4); q, k, v and gate, up each cast to bf16 by autocast (5 x 2H);
    # attention q 2Q, k and v repeated to 14 heads (2 x 2Q), output 2Q, logsumexp 4 x 14, packed concat 2Q;
    # MLP gate, up (2 x 2I) and down's input (2I). Q = 896.
    per = 2 * (2 * H + 4) + 5 * 2 * H + (2 * 896 + 2 * 2 * 896 + 2 * 896 + 4 * 14 + 2 * 896) + 3 * 2 * I
    assert per == 50_752
    assert got["activations"] == (L + 1) * 16384 * per
    chunk = 1536  # 512 MiB // (V x 2 B) = 1,766 tokens, rounded down to a multiple of 256
    loss = 16384 * (2 * H + 4 + 4 * H) + chunk * V * 2 + 4 * V * H + 2 * V * H  # + fp32 dW, bf16 W copy
    assert got["loss"] == loss
    rest = 4 * P + 2 * linear + 4 * P + 8 * P + (L + 1) * 16384 * per + loss
    assert got["overhead"] == pytest.approx(0.75 * GIB + 0.05 * rest)
    assert plan.total_bytes == pytest.approx(rest + 0.75 * GIB + 0.05 * rest)
    assert plan.total_bytes / GIB == pytest.approx(30.85, abs=0.01) and plan.verdict == "does not fit"
    checkpointed = make_plan(
        shape("qwen2.5-0.5b"),
        Options(micro_batch_tokens=16384, activation_checkpointing=True),
        GPUS["rtx4090"],
    )
    # Checkpointing: 24 block inputs of 2H bytes per token, plus one block recomputed and its gradients
    assert rows(checkpointed)["activations"] == L * 16384 * 2 * H + 2 * 16384 * per
    assert checkpointed.verdict == "fits"


def test_qwen25_7b_qlora_on_an_rtx4090_by_hand():
    """QLoRA r=16 on all 7 projections, bf16 compute, 16,384 tokens, activation checkpointing."""
    P, H, I, V, L, r = 7_615_616_512, 3584, 18944, 152_064, 28, 16
    linear = L * (2 * 3584 * 3584 + 2 * 512 * 3584 + 3 * 18944 * 3584)
    lora = L * r * ((3584 + 3584) * 2 + (3584 + 512) * 2 + (3584 + 18944) * 3)
    assert (linear, lora) == (6_525_288_448, 40_370_176)
    o = Options(method="qlora", micro_batch_tokens=16384, activation_checkpointing=True)
    plan = make_plan(shape("qwen2.5-7b"), o, GPUS["rtx4090"])
    got = rows(plan)
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)
    assert NF4_BYTES_PER_WEIGHT == nf4
    assert got["weights"] == pytest.approx(linear * nf4 + (P - linear) * 2 + 18944 * 3584 * 2)
    assert got["adapters"] == lora * (4 + 2)  # fp32, and autocast's bf16 copies
    assert got["gradients"] == 4 * lora and got["optimizer"] == 8 * lora
    # Per token per block: norms 2 x (2H + 4); attention q 2Q, repeated k and v 2 x 2Q, output 2Q,
    # logsumexp 4 x 28, o_proj's LoRA op keeps the packed concat 2Q; MLP gate and up 2 x 2I; the LoRA
    # ops' inputs (q/k/v share h: 2H; gate/up share: 2H; down: 2I), x A^T (7 x 4r), bool masks (dropout
    # 0.05) of every adapted input (3H + Q + 2H + I).
    Q = 3584
    per = 2 * (2 * H + 4) + (2 * Q + 2 * 2 * Q + 2 * Q + 4 * 28 + 2 * Q) + 2 * 2 * I
    per += 2 * H + 2 * H + 2 * I + 7 * 4 * r + (3 * H + Q + 2 * H + I)
    assert got["activations"] == L * 16384 * 2 * H + 2 * 16384 * per
    assert got["loss"] == 16384 * (2 * H + 4 + 4 * H) + 1536 * V * 2  # frozen head: no dW
    assert plan.verdict == "fits" and 16 < plan.total_bytes / GIB < 20
    without = make_plan(
        shape("qwen2.5-7b"), Options(method="qlora", micro_batch_tokens=16384), GPUS["rtx4090"]
    )
    assert without.verdict == "does not fit"


def test_fsdp_divides_the_training_state_and_ddp_does_not():
    """Qwen2.5-7B full, bf16, 8 x RTX 4090. FSDP: weights, gradients and AdamW states / 8, plus the root
    and two blocks gathered in bf16 and one block's gradients (bf16 + fp32); no autocast copies.
    DDP: a whole replica each. auto: FSDP (16 B x 7.6B parameters is more than 60% of 24 GiB)."""
    s = shape("qwen2.5-7b")
    P, block = 7_615_616_512, 233_046_016 + 2 * 3584 + 4608  # linears, 2 norms, q/k/v biases
    root = P - 28 * block
    assert (s.block, s.root) == (block, root) and root == 2 * 152_064 * 3584 + 3584
    o = Options(nproc=8, strategy="auto", micro_batch_tokens=4096, activation_checkpointing=True)
    fsdp = make_plan(s, o, GPUS["rtx4090"])
    got = rows(fsdp)
    assert fsdp.strategy == "fsdp"
    assert got["weights"] == 4 * P / 8 and got["gradients"] == 4 * P / 8 and got["optimizer"] == 8 * P / 8
    assert got["fsdp gathered"] == (root + 2 * block) * 2 + block * (2 + 4)
    ddp = make_plan(s, Options(nproc=8, strategy="ddp", micro_batch_tokens=4096), GPUS["rtx4090"])
    assert rows(ddp)["weights"] == 4 * P + 2 * s.linear and rows(ddp)["optimizer"] == 8 * P
    offload = make_plan(s, Options(**{**o.__dict__, "cpu_offload": True}), GPUS["rtx4090"])
    assert rows(offload)["weights"] == rows(offload)["optimizer"] == 0
    assert offload.host_bytes == (4 + 4 + 8) * P / 8 and offload.verdict == "fits"
    assert fsdp.verdict == "does not fit"  # 25 GiB: the fp32 [V, H] head gradient and the gathered root
    small = make_plan(shape("qwen2.5-0.5b"), Options(nproc=8, micro_batch_tokens=4096), GPUS["h100"])
    assert small.strategy == "ddp"  # 16 B x 494M = 7.4 GiB < 60% of 80 GiB
    with pytest.raises(Exception, match="qlora runs in one process"):
        make_plan(s, Options(method="qlora", nproc=2), GPUS["rtx4090"])


def test_the_strategy_rule_and_state_bytes_agree_with_parallelize():
    from fasttune.plan import memory
    from fasttune.train import parallelize, strategy
    from fasttune.train.parallelize import training_state_bytes as parallel_state

    # one rule (train/strategy.py), called by the planner and the run alike
    assert memory.decide_strategy is parallelize.decide_strategy is strategy.decide_strategy
    for method, precision in (("full", "bf16"), ("full", "bf16-pure"), ("lora", "bf16"), ("lora", "fp32")):
        o = Options(method=method, precision=precision)
        s = shape("qwen2.5-0.5b", o.lora)
        with torch.device("meta"):
            model = CausalLM(s.config)
        if precision == "bf16-pure" or (method != "full" and precision != "fp32"):
            model = model.to(torch.bfloat16)
        if method != "full":
            apply_lora(model, o.lora)
        assert training_state_bytes(s, o) == parallel_state(model, precision), (method, precision)


def test_the_loss_chunk_is_the_ops():
    from fasttune.ops.linear_cross_entropy import _CHUNK_BYTES, _auto_chunk_size
    from fasttune.plan.memory import LCE_CHUNK_BYTES, _chunk_tokens

    assert LCE_CHUNK_BYTES == _CHUNK_BYTES
    for T, V, b in ((16384, 151_936, 2), (100, 151_936, 2), (16384, 128_256, 4), (8192, 32_000, 2)):
        assert _chunk_tokens(T, V, b) == _auto_chunk_size(T, V, b)


def test_fits_tight_and_does_not_fit_against_the_gpu_memory():
    s = shape("qwen2.5-0.5b")
    o = Options(micro_batch_tokens=4096, activation_checkpointing=True)
    total = make_plan(s, o, GPUS["rtx4090"]).total_bytes / GIB
    assert make_plan(s, o, GPUS["rtx4090"], gpu_memory_gib=total / 0.94).verdict == "fits"
    assert make_plan(s, o, GPUS["rtx4090"], gpu_memory_gib=total / 0.97).verdict == "tight"
    assert make_plan(s, o, GPUS["rtx4090"], gpu_memory_gib=total * 0.99).verdict == "does not fit"
    assert CUDA_CONTEXT_BYTES == 0.75 * GIB


# ----------------------------------------------------------------------------------------------------------
# Time


def test_time_per_epoch_by_hand():
    """Qwen2.5-0.5B full: 6 N + 6 x layers x n_q x hd x document length FLOPs per token; at MFU 40% of an
    RTX 4090's 165.2 TFLOP/s; 10^8 tokens per epoch."""
    s = shape("qwen2.5-0.5b")
    fpt = 6 * 494_032_768 + 6 * 24 * 14 * 64 * 512
    o = Options(seq_len=512, tokens_per_step=16384)
    plan = make_plan(s, o, GPUS["rtx4090"], epoch_tokens=1e8, mfu=0.4)
    assert plan.flops_per_token == fpt
    tps = 165.2e12 * 0.4 / fpt
    assert plan.tokens_per_s == pytest.approx(tps) and plan.seconds_per_epoch == pytest.approx(1e8 / tps)
    assert plan.seconds_per_step == pytest.approx(16384 / tps)
    # LoRA: 4 N; activation checkpointing recomputes the forward (2 N + a third of the attention)
    lora = make_plan(s, Options(seq_len=512, method="lora"), GPUS["rtx4090"], epoch_tokens=1e8, mfu=0.4)
    assert lora.flops_per_token == 4 * 494_032_768 + 6 * 24 * 14 * 64 * 512
    ac = make_plan(s, Options(seq_len=512, activation_checkpointing=True), GPUS["rtx4090"], 24, 1e8, mfu=0.4)
    hw = fpt + 2 * 494_032_768 + 2 * 24 * 14 * 64 * 512
    assert ac.seconds_per_epoch == pytest.approx(1e8 * hw / (165.2e12 * 0.4))
    two = make_plan(s, Options(seq_len=512, nproc=2, strategy="ddp"), GPUS["rtx4090"], None, 1e8, mfu=0.4)
    assert two.seconds_per_epoch == pytest.approx(plan.seconds_per_epoch / 2)
    assumed = make_plan(s, o, GPUS["rtx4090"], epoch_tokens=1e8, results=None)
    assert assumed.mfu == ASSUMED_MFU["full"] and assumed.mfu_source.startswith("assumed")


def test_a_measured_mfu_is_used_when_one_matches(tmp_path):
    records = [
        {"gpu": "NVIDIA H100 PCIe", "method": "full", "mfu": 0.2},  # another GPU: H100 PCIe, not SXM
        {"gpu": "NVIDIA H100 80GB HBM3", "method": "lora", "mfu": 0.3},  # another method
        {
            "gpu": "NVIDIA H100 80GB HBM3",
            "method": "full",
            "mfu": 0.41,
            "model": "qwen3-8b",
            "date": "2026-01-01",
        },
        {
            "gpu": "NVIDIA H100 80GB HBM3",
            "method": "full",
            "mfu": 0.45,
            "model": "qwen2.5-0.5b",
            "date": "2025-01-01",
        },
        {"gpu": "NVIDIA H100 80GB HBM3", "method": "full", "mfu": 7},  # not a fraction: ignored
    ]
    (tmp_path / "run.json").write_text(json.dumps({"mfu_measurements": records}))
    (tmp_path / "other.json").write_text(json.dumps({"results": {}}))
    (tmp_path / "broken.json").write_text("{")
    o = Options()
    mfu, source, _ = measured_mfu(GPUS["h100"], o, "qwen2.5-0.5b", tmp_path)
    assert mfu == 0.45 and "run.json" in source
    assert measured_mfu(GPUS["h100"], o, "qwen3-8b", tmp_path)[0] == 0.41
    assert measured_mfu(GPUS["h100-pcie"], o, "qwen3-8b", tmp_path)[0] == 0.2
    assert measured_mfu(GPUS["rtx4090"], o, "qwen3-8b", tmp_path) is None
    plan = make_plan(shape("qwen2.5-0.5b"), o, GPUS["h100"], results=tmp_path)
    assert plan.mfu == 0.45 and plan.mfu_source.startswith("measured")
    assert math.isclose(plan.tokens_per_s, 989e12 * 0.45 / plan.flops_per_token)


# ----------------------------------------------------------------------------------------------------------
# The command line


def test_plan_prints_the_table_and_json(capsys, tmp_path):
    argv = [
        "plan",
        "--model",
        "qwen2.5-7b",
        "--method",
        "qlora",
        "--gpu",
        "rtx4090",
        "--tokens-per-step",
        "16384",
    ]
    argv += ["--results", str(tmp_path)]  # no measurements there: the assumed MFU
    assert main(argv) == 0
    out = capsys.readouterr().out
    for part in ("weights", "adapters", "gradients", "optimizer", "activations", "loss", "overhead", "total"):
        assert f"\n  {part}" in out
    assert "does not fit" in out and "with activation_checkpointing" in out and "MFU 25% (assumed" in out
    assert main(argv + ["--activation-checkpointing", "--dataset-tokens", "1e7", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["verdict"] == "fits" and d["strategy"] == "single" and d["seconds_per_epoch"] > 0
    assert set(d["rows"]) == {
        "weights",
        "adapters",
        "gradients",
        "optimizer",
        "activations",
        "loss",
        "overhead",
    }
    assert main(["plan", "--model", "qwen2.5-7b", "--gpu", "rtx9999"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
    assert resolve_gpu("RTX4090") is GPUS["rtx4090"]


def test_plan_reads_the_tokens_of_a_jsonl_file_and_of_prepared_data(tmp_path, capsys):
    from fasttune.data import synth
    from fasttune.data.packing import TokenizeOptions, pack_bfd, packing_efficiency, tokenize
    from fasttune.data.records import Example, write_jsonl
    from fasttune.models.tokenizer import builtin_tokenizer

    records = synth.generate(50, seed=1)
    write_jsonl(tmp_path / "d.jsonl", records)
    argv = ["plan", "--model", "qwen2.5-0.5b", "--tokens-per-step", "1024", "--json"]
    assert main(argv + ["--data", str(tmp_path / "d.jsonl")]) == 0
    d = json.loads(capsys.readouterr().out)
    examples = [
        Example([{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}])
        for r in records
    ]
    data, _ = tokenize(examples, builtin_tokenizer(), TokenizeOptions(max_seq_len=2048, too_long="drop"))
    eff = packing_efficiency(data.lengths, pack_bfd(data.lengths, 1024), 1024)
    assert d["epoch_tokens"] == pytest.approx(data.lengths.sum() / eff)
    assert d["options"]["seq_len"] == pytest.approx(data.lengths.mean())
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    report = {"splits": {"train": {"tokens": 9000, "examples": 100}}, "packing": {"efficiency": 0.9}}
    (prepared / "prepare.json").write_text(json.dumps(report))
    assert main(argv + ["--data", str(prepared)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["epoch_tokens"] == pytest.approx(10000) and d["options"]["seq_len"] == 90


def test_run_dry_run_shows_the_plan(setup, capsys):
    assert main(["run", "--dry-run", f"model={setup / 'model'}", "method=qlora", "--gpu", "a100-80g"]) == 0
    out = capsys.readouterr().out
    assert "M trainable (qlora)" in out and "memory estimate per GPU" in out and "A100 (80 GiB)" in out
    assert "NF4" in out and "epoch:" in out


def test_the_7b_fsdp_config_plans_8_gpus_without_weights(capsys):
    config = "configs/qwen2.5-7b-fsdp.yaml"
    argv = ["run", config, "--dry-run", "--nproc", "8", "--gpu", "rtx4090"]
    assert main(argv) == 2  # the placeholder model folder is refused, not silently replaced
    assert "is not a folder" in capsys.readouterr().err
    assert main(argv + ["--shape", "qwen2.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "8 x RTX 4090 (24 GiB), fsdp" in out and "of 24: fits" in out and "cpu_offload" in out
    assert main(["run", config, "cpu_offload=false", *argv[2:], "--shape", "qwen2.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "with cpu_offload" in out
    assert main(["run", config, "--gpu", "rtx4090"]) == 2
    assert "--dry-run" in capsys.readouterr().err
