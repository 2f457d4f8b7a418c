"""`fasttune export`: hf / peft / merged folders that transformers and peft load with the same logits, and
GGUF files that the gguf package reads back with every tensor exact (f32, f16, bf16) or within Q8_0's
error bound, with the metadata llama.cpp needs. When llama-cpp-python is installed, llama.cpp itself loads
the files and its tokens and logits are compared with ours (tests/test_export_llamacpp.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from fasttune.cli.main import main as cli_main
from fasttune.data import synth
from fasttune.errors import FasttuneError, TokenizerError
from fasttune.export.formats import export
from fasttune.models import builtin
from fasttune.models.lora import LoraConfig, apply_lora, save_adapter
from fasttune.models.model import rope_inv_freq
from fasttune.models.tokenizer import BUILTIN_DIR, Tokenizer, load_tokenizer
from fasttune.models.weights import load_model
from helpers import FAMILIES as FAMILIES_CFG
from helpers import hf_model

try:
    import gguf
except ImportError:  # an optional dependency: the GGUF tests skip, the hf/peft/merged ones still run
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed (pip install gguf)")
from fasttune.export.gguf import (  # noqa: E402
    _LLAMA3_REGEX,
    _QWEN2_REGEX,
    gguf_tensor_name,
    interleave_rope_rows,
    llama3_rope_factors,
    pre_tokenizer_name,
)

T = gguf.GGMLQuantizationType if gguf is not None else None
IDS = torch.tensor([[3, 17, 42, 5, 99, 23, 8, 61, 7, 30, 2, 11]])

# Shapes for Q8_0: every weight row (the input dim) a multiple of Q8_0's block of 32. Head layouts kept
# from helpers' FAMILIES: GQA, an untied head, Qwen3's explicit head_dim (24, not H / n_q = 16).
Q8_SHAPES = {
    "qwen2_tied": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen2_untied": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1),
    "qwen3": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24
    ),
    "llama": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
}
FAMILIES = list(Q8_SHAPES)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def small_tokenizer(pre: str) -> Tokenizer:
    """A byte-level BPE of 400 tokens trained on the synthetic corpus, with ChatML's special tokens and the
    Qwen2.5 chat template, split by the pre-tokenizer of `pre`: "qwen2" or "llama-bpe" (their regexes),
    or "gpt-2" (fasttune's built-in BPE: a plain ByteLevel pre-tokenizer)."""
    texts = [r[k] for r in synth.generate(300, seed=1) for k in ("input", "output")]
    texts += ["12345 6789, it's"] * 200  # digits, so that the pre-tokenizers' digit rules show
    tok = builtin.train_tokenizer(texts, vocab_size=400)
    if pre == "gpt-2":
        return tok
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer(models.BPE())
    regex = {"qwen2": _QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX}[pre]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=builtin.SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk, tok.config, source=f"small {pre} BPE")


FAMILY_PRE = {"qwen2_tied": "gpt-2", "qwen2_untied": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}


def make_checkpoint(path, family: str, dtype=torch.float32, q8_shapes: bool = True, seed: int = 0, **config):
    """A random transformers checkpoint of `family` (config fields overridden by `config`) with a small
    tokenizer saved beside it; returns the fp32 transformers model and the tokenizer."""
    tok = small_tokenizer(FAMILY_PRE[family])
    overrides = dict(Q8_SHAPES[family]) if q8_shapes else {}
    model = hf_model(family, seed, vocab_size=tok.vocab_size, **{**overrides, **config})
    model.to(dtype).save_pretrained(path)
    tok.save(path)
    return model.float(), tok


def read_gguf(path):
    """{name: field contents} and {name: ReaderTensor}."""
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def expected_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> the fp32 source tensor as llama.cpp must receive it (Llama's q/k rows interleaved)."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach().float()
        if arch == "llama" and ".q_proj." in name:
            t = interleave_rope_rows(t, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            t = interleave_rope_rows(t, cfg.num_key_value_heads)
        out[gguf_tensor_name(name)] = t
    return out


def dequantized(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type)


# ----------------------------------------------------------------------------------------------------------
# GGUF: the real Qwen2.5 tokenizer on a tiny Qwen2 with Qwen2.5's padded vocabulary (151,936 > 151,665)


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny tied Qwen2 with vocab_size 151,936 in bf16 + Qwen2.5's tokenizer, exported to bf16 GGUF and
    read back once (reading 151,936 tokens and 151,387 merges takes the gguf package a few seconds)."""
    root = tmp_path_factory.mktemp("qwen-real")
    src = root / "model"
    model = hf_model("qwen2_tied", vocab_size=151936, bos_token_id=151643, **Q8_SHAPES["qwen2_tied"])
    model.to(torch.bfloat16).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((qwen_tokenizer_dir / f).read_bytes())
    out = export(src, root / "qwen.gguf", "gguf")
    fields, tensors = read_gguf(out)
    return dict(root=root, src=src, out=out, fields=fields, tensors=tensors, model=model)


@needs_gguf
def test_gguf_qwen_architecture_metadata(qwen_gguf):
    f = qwen_gguf["fields"]
    assert f["general.architecture"] == "qwen2"
    assert f["general.type"] == "model" and f["general.name"] == "model"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expected = {
        "context_length": 512,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 96,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
    }
    for key, value in expected.items():
        assert f[f"qwen2.{key}"] == value, key
    assert f["qwen2.rope.freq_base"] == 1e6
    assert f["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)  # stored as f32
    assert "qwen2.attention.key_length" not in f  # no head_dim in config.json: llama.cpp derives H / n_q


@needs_gguf
def test_gguf_qwen_tokenizer_metadata(qwen_gguf, qwen_tokenizer_dir):
    f = qwen_gguf["fields"]
    tok = load_tokenizer(qwen_tokenizer_dir)
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    assert len(vocab) == 151665
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 151936  # the model's vocabulary, not the tokenizer's
    by_id = {i: t for t, i in vocab.items()}
    assert all(tokens[i] == by_id[i] for i in range(151665))
    # The embedding's padding rows: placeholder names, type UNUSED.
    assert tokens[151665:] == [f"[PAD{i}]" for i in range(151665, 151936)]
    assert set(types[151665:]) == {gguf.TokenType.UNUSED}
    # Added tokens: CONTROL when special or written <|...|>; <tool_call> is neither, so USER_DEFINED.
    for text, typ in [
        ("<|endoftext|>", gguf.TokenType.CONTROL),
        ("<|im_start|>", gguf.TokenType.CONTROL),
        ("<|im_end|>", gguf.TokenType.CONTROL),
        ("<|fim_prefix|>", gguf.TokenType.CONTROL),  # special: false in tokenizer_config, but looks it
        ("<tool_call>", gguf.TokenType.USER_DEFINED),
        ("Ġthe", gguf.TokenType.NORMAL),
    ]:
        assert types[vocab[text]] == typ, text
    assert types.count(gguf.TokenType.NORMAL) == 151643
    merges = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    # Ids as Qwen2.5's own GGUF files have them: eos <|im_end|> (tokenizer_config), pad <|endoftext|>,
    # bos from config.json; the template adds no bos.
    assert f["tokenizer.ggml.eos_token_id"] == 151645
    assert f["tokenizer.ggml.padding_token_id"] == 151643
    assert f["tokenizer.ggml.bos_token_id"] == 151643
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == tok.chat_template and "<|im_start|>" in tok.chat_template


@needs_gguf
def test_gguf_qwen_bf16_tensors_bit_exact(qwen_gguf):
    """Every tensor equals the source: 2-D weights as the very bf16 bits of the checkpoint, norms and
    biases as F32; no `output` tensor, the head being tied."""
    ours = load_model(qwen_gguf["src"])  # as stored: bf16
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    tensors = qwen_gguf["tensors"]
    assert "output.weight" not in tensors
    expected = {n: t for n, t in ours.state_dict().items() if n != "lm_head.weight"}
    assert set(tensors) == {gguf_tensor_name(n) for n in expected}
    for name, src in expected.items():
        t = tensors[gguf_tensor_name(name)]
        assert tuple(reversed(t.shape.tolist())) == tuple(src.shape), name  # GGUF lists dims inner first
        if src.dim() == 2:
            assert t.tensor_type == T.BF16, name
            bits = t.data.view(np.uint16).reshape(src.shape)
            assert np.array_equal(bits, src.view(torch.int16).numpy().view(np.uint16)), name
        else:
            assert t.tensor_type == T.F32, name
            assert np.array_equal(t.data, src.float().numpy()), name


# ----------------------------------------------------------------------------------------------------------
# GGUF: every family and type, with small tokenizers


@needs_gguf
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_bf16_every_family(tmp_path, family):
    model, tok = make_checkpoint(tmp_path / "src", family, dtype=torch.bfloat16)
    out = export(tmp_path / "src", tmp_path / "m.gguf", "gguf", quant="bf16")
    fields, tensors = read_gguf(out)
    arch = {"qwen2_tied": "qwen2", "qwen2_untied": "qwen2", "qwen3": "qwen3", "llama": "llama"}[family]
    ours = load_model(tmp_path / "src", dtype=torch.float32)  # bf16 values, exactly, in fp32
    expected = expected_tensors(ours, arch)
    extra = {"rope_freqs.weight"} if family == "llama" else set()
    assert set(tensors) == set(expected) | extra
    assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)
    # Our names are llama.cpp's: the gguf package's own map from Hugging Face names agrees.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    for hf_name in ours.state_dict():
        if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        assert name_map.get_name(hf_name, try_suffixes=(".weight", ".bias")) == gguf_tensor_name(hf_name)
    for name, src in expected.items():
        t = tensors[name]
        assert t.tensor_type == (T.BF16 if src.dim() == 2 else T.F32), name
        assert np.array_equal(dequantized(t).reshape(src.shape), src.numpy()), name
    assert fields["general.architecture"] == arch
    assert fields["tokenizer.ggml.pre"] == FAMILY_PRE[family]
    assert fields["tokenizer.ggml.tokens"][tok.token_to_id("<|im_end|>")] == "<|im_end|>"
    cfg = ours.config
    if family == "qwen3":  # head_dim 24 is not H / n_q = 16: llama.cpp must be told
        assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == 24
    if family == "llama":
        assert fields["llama.vocab_size"] == cfg.vocab_size
        assert fields["llama.rope.dimension_count"] == cfg.head_dim
        assert fields["llama.rope.freq_base"] == 500000.0
        assert fields["tokenizer.ggml.pre"] == "llama-bpe"


LINEAR_ROPE = dict(rope_parameters=dict(rope_type="linear", factor=2.5, rope_theta=10000.0))


@needs_gguf
def test_gguf_linear_rope_scaling(tmp_path):
    make_checkpoint(tmp_path / "src", "qwen2_untied", **LINEAR_ROPE)
    assert load_model(tmp_path / "src").config.rope_scaling["rope_type"] == "linear"
    fields, tensors = read_gguf(export(tmp_path / "src", tmp_path / "m.gguf", "gguf"))
    assert fields["qwen2.rope.scaling.type"] == "linear" and fields["qwen2.rope.scaling.factor"] == 2.5
    assert fields["qwen2.rope.freq_base"] == 10000.0 and "rope_freqs.weight" not in tensors


def test_llama3_rope_factors_match_the_model():
    """llama.cpp divides theta^(-2i/hd) by rope_freqs[i]; that must give the model's scaled frequencies.
    With hd 32 and an original context of 32 all three bands occur: wavelengths under 8 kept, over 32
    divided by 8, and 14.3 in between interpolated."""
    from fasttune.models.model import ModelConfig

    rope = dict(FAMILIES_CFG["llama"][1]["rope_parameters"])
    cfg = ModelConfig.from_hf(
        dict(
            model_type="llama",
            vocab_size=10,
            hidden_size=128,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            rope_parameters=rope,
        )
    )
    factors = llama3_rope_factors(cfg)
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    torch.testing.assert_close(base / factors, rope_inv_freq(cfg), rtol=1e-6, atol=0)
    assert factors.min() == 1.0 and factors.max() == 8.0
    assert ((factors > 1) & (factors < 8)).sum() == 1


def test_llama_row_interleave_is_llama_cpp_rope():
    """The permutation's purpose, checked with llama.cpp's rotation written out: rotating adjacent pairs
    (2j, 2j+1) of the permuted q and k gives the same attention scores as rotating (j, j + hd/2) of the
    originals, as Hugging Face does."""
    torch.manual_seed(0)
    n, hd, H, T_ = 3, 8, 20, 5
    wq, wk = torch.randn(n * hd, H, dtype=torch.float64), torch.randn(n * hd, H, dtype=torch.float64)
    x = torch.randn(T_, H, dtype=torch.float64)
    pos = torch.arange(T_, dtype=torch.float64)[:, None]
    ang = pos * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # [T, hd/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def hf_rope(v):  # [T, n, hd], pairs (j, j + hd/2)
        a, b = v[..., : hd // 2], v[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def llama_cpp_rope(v):  # pairs (2j, 2j + 1)
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)

    q, k = (x @ wq.T).view(T_, n, hd), (x @ wk.T).view(T_, n, hd)
    ref = torch.einsum("tnd,snd->nts", hf_rope(q), hf_rope(k))
    pq = (x @ interleave_rope_rows(wq, n).T).view(T_, n, hd)
    pk = (x @ interleave_rope_rows(wk, n).T).view(T_, n, hd)
    got = torch.einsum("tnd,snd->nts", llama_cpp_rope(pq), llama_cpp_rope(pk))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # Without the permutation the scores differ: the test can tell.
    wrong = torch.einsum("tnd,snd->nts", llama_cpp_rope(q), llama_cpp_rope(k))
    assert not torch.allclose(wrong, ref, atol=1e-3)


def q8_0_bound(x: np.ndarray, d16: np.ndarray) -> np.ndarray:
    """Per block of 32, the largest |dequantised - x| Q8_0 allows, derived from how it quantises:

        d = max|x| / 127 (fp32),  q = round(x / d),  stored: q (int8) and d16 = fp16(d);  x' = q * d16

    |x' - x| <= |q d - x| + |q| |d16 - d| <= d/2 + 127 |d16 - d|: the rounding of x / d to an integer,
    plus the scale's own rounding to fp16 (up to 2^-11 relative, times |q| <= 127, so up to ~6% of d
    beyond d/2). The fp32 arithmetic (1/d, x * (1/d), q * d16) adds a few ulps of 127: 2^-15 d covers it.
    """
    d = (np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)).astype(np.float32)
    return d.astype(np.float64) * (0.5 + 2.0**-15) + 127 * np.abs(d16.astype(np.float64) - d)


@needs_gguf
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_q8_0_within_its_error_bound(tmp_path, family):
    make_checkpoint(tmp_path / "src", family, dtype=torch.float32)
    out = export(tmp_path / "src", tmp_path / "m.gguf", "gguf", quant="q8_0")
    fields, tensors = read_gguf(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    arch = fields["general.architecture"]
    expected = expected_tensors(load_model(tmp_path / "src", dtype=torch.float32), arch)
    worst = 0.0
    for name, src in expected.items():
        t, x = tensors[name], src.numpy()
        if src.dim() < 2:
            assert t.tensor_type == T.F32 and np.array_equal(t.data, x), name
            continue
        assert t.tensor_type == T.Q8_0, name
        blocks = t.data.reshape(-1, 34)  # per block: fp16 scale (2 bytes), then 32 int8
        d16 = blocks[:, :2].copy().view(np.float16).ravel()
        d32 = (np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)).astype(np.float32)
        assert np.array_equal(d16, d32.astype(np.float16)), name  # the scale is fp16(max|x| / 127)
        err = np.abs(dequantized(t).reshape(x.shape).astype(np.float64) - x).reshape(-1, 32).max(axis=1)
        assert (err <= q8_0_bound(x, d16)).all(), name
        worst = max(worst, float((err / d32).max()))
    # The errors reach close to half a step somewhere: the comparison is against the right values.
    assert 0.45 < worst <= 0.5 + 127 * 2.0**-11


@needs_gguf
def test_gguf_q8_0_rows_not_multiple_of_32_fall_back_to_f16(tmp_path):
    """helpers' own qwen2_tied shapes (H 60, I 84): no 2-D weight has rows that split into blocks of 32,
    so each is F16, as llama.cpp's converter falls back, and equals the source rounded to fp16."""
    make_checkpoint(tmp_path / "src", "qwen2_tied", q8_shapes=False)
    out = export(tmp_path / "src", tmp_path / "m.gguf", "gguf", quant="q8_0")
    _, tensors = read_gguf(out)
    expected = expected_tensors(load_model(tmp_path / "src"), "qwen2")
    for name, src in expected.items():
        t = tensors[name]
        if src.dim() == 2:
            assert src.shape[1] % 32 and t.tensor_type == T.F16, name
            assert np.array_equal(t.data.reshape(src.shape), src.numpy().astype(np.float16)), name


@needs_gguf
@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_gguf_f32_and_f16(tmp_path, quant):
    qtype = T[quant.upper()]
    make_checkpoint(tmp_path / "src", "llama")
    out = export(tmp_path / "src", tmp_path / "m.gguf", "gguf", quant=quant)
    fields, tensors = read_gguf(out)
    expected = expected_tensors(load_model(tmp_path / "src"), "llama")
    for name, src in expected.items():
        t = tensors[name]
        want = src.numpy() if src.dim() < 2 or qtype == T.F32 else src.numpy().astype(np.float16)
        assert t.tensor_type == (qtype if src.dim() == 2 else T.F32), name
        assert np.array_equal(t.data.reshape(src.shape), want), name
    assert tensors["rope_freqs.weight"].tensor_type == T.F32


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

    def split(regex):
        return {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        }

    assert pre_tokenizer_name(split(_QWEN2_REGEX), "t") == "qwen2"
    assert pre_tokenizer_name(split(_LLAMA3_REGEX), "t") == "llama-bpe"
    assert pre_tokenizer_name({**byte_level, "use_regex": True}, "t") == "gpt-2"
    # The Qwen2.5 tokenizer bundled with fasttune is detected as Qwen2's.
    data = json.loads(builtin_json())
    assert pre_tokenizer_name(data["pre_tokenizer"], "t") == "qwen2"
    for bad in (
        split(_QWEN2_REGEX.replace(r"\p{N}|", r"\p{N}{1,2}|")),  # a regex llama.cpp does not have
        {**byte_level, "use_regex": True, "add_prefix_space": True},
        {"type": "Metaspace", "replacement": "▁"},
        None,
    ):
        with pytest.raises(TokenizerError, match="pre_tokenizer"):
            pre_tokenizer_name(bad, "tok/tokenizer.json")


def builtin_json() -> str:
    import lzma

    return lzma.decompress((BUILTIN_DIR / "tokenizer.json.xz").read_bytes()).decode()


# ----------------------------------------------------------------------------------------------------------
# GGUF errors


@needs_gguf
def test_gguf_errors_name_the_problem(tmp_path, monkeypatch):
    hf_model("mistral").save_pretrained(tmp_path / "mistral")
    small_tokenizer("qwen2").save(tmp_path / "mistral")
    with pytest.raises(FasttuneError, match=r"model_type='mistral'.*supported: llama, qwen2, qwen3"):
        export(tmp_path / "mistral", tmp_path / "m.gguf", "gguf")

    # A tokenizer with more tokens than the model has embeddings.
    hf_model("qwen2_untied", vocab_size=101).save_pretrained(tmp_path / "short")
    small_tokenizer("qwen2").save(tmp_path / "short")
    with pytest.raises(TokenizerError, match=r"ids up to 399 but the model's vocab_size is 101"):
        export(tmp_path / "short", tmp_path / "m.gguf", "gguf")

    hf_model("qwen2_untied").save_pretrained(tmp_path / "notok")
    with pytest.raises(FasttuneError, match="no tokenizer.json"):
        export(tmp_path / "notok", tmp_path / "m.gguf", "gguf")

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(FasttuneError, match=r"pip install 'fasttune\[gguf\]'"):
        export(tmp_path / "short", tmp_path / "m.gguf", "gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind


# ----------------------------------------------------------------------------------------------------------
# hf / peft / merged


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A base checkpoint and an adapter folder as `fasttune run` leaves one (PEFT format, the tokenizer
    beside it), with B random so that the adapter changes the logits; and our logits with the adapter."""
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    make_checkpoint(base, "qwen2_untied")
    model = load_model(base)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj")))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    run = root / "run"
    save_adapter(model, run / "adapter", base_model_path=str(base.resolve()))
    load_tokenizer(base).save(run / "adapter")
    model.eval()
    with torch.no_grad():
        logits = model.logits(IDS)
    return dict(root=root, base=base, run=run, adapter=run / "adapter", logits=logits, model=model)


def hf_logits(path):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(IDS).logits


def test_export_hf_round_trip(tmp_path):
    ref, _ = make_checkpoint(tmp_path / "src", "llama")
    out = export(tmp_path / "src", tmp_path / "hf", "hf")
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out), ref(IDS).logits, rtol=1e-5, atol=1e-5)
    assert load_tokenizer(out).chat_template  # the tokenizer and template travel with it
    # --dtype casts; bf16 then loads as bf16.
    out16 = export(tmp_path / "src", tmp_path / "hf16", "hf", dtype="bf16")
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(out16).lm_head.weight.dtype == torch.bfloat16


def test_export_peft_round_trip(tmp_path, lora_run):
    import peft
    import transformers

    out = export(lora_run["base"], tmp_path / "peft", "peft", adapter=lora_run["adapter"])
    assert (out / "tokenizer.json").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(lora_run["base"].resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = theirs(IDS).logits
    torch.testing.assert_close(got, lora_run["logits"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, hf_logits(lora_run["base"]), atol=1e-3)  # the adapter does something


def test_export_merged_round_trip(tmp_path, lora_run):
    out = export(lora_run["adapter"], tmp_path / "merged", "merged")  # the adapter folder names its base
    assert not (out / "adapter_config.json").exists()
    torch.testing.assert_close(hf_logits(out), lora_run["logits"], rtol=1e-5, atol=1e-5)


@needs_gguf
def test_export_gguf_merges_the_adapter(tmp_path, lora_run):
    """From a run folder: base + adapter merged in fp32, then written; the GGUF tensors are the merged
    weights (f32 here: exactly)."""
    out = export(lora_run["run"], tmp_path / "m.gguf", "gguf", quant="f32")
    fields, tensors = read_gguf(out)
    assert fields["general.name"] == "adapter"
    merged = load_model(lora_run["base"])
    from fasttune.models.lora import load_adapter, merge_lora

    load_adapter(merged, lora_run["adapter"])
    merge_lora(merged)
    for name, src in expected_tensors(merged, "qwen2").items():
        assert np.array_equal(tensors[name].data.reshape(src.shape), src.numpy()), name
    q = tensors["blk.0.attn_q.weight"].data
    assert not np.array_equal(
        q, load_model(lora_run["base"]).model.layers[0].self_attn.q_proj.weight.detach().numpy()
    )


@needs_gguf
def test_export_refuses_to_overwrite_and_checks_arguments(tmp_path, lora_run):
    make_checkpoint(tmp_path / "src", "qwen2_untied")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(FasttuneError, match="already exists"):
        export(tmp_path / "src", tmp_path / "taken", "hf")
    assert (tmp_path / "taken" / "keep.txt").exists()
    out = export(tmp_path / "src", tmp_path / "taken", "hf", force=True)  # replaced whole
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    (tmp_path / "x.gguf").write_text("old")
    with pytest.raises(FasttuneError, match="already exists"):
        export(tmp_path / "src", tmp_path / "x.gguf", "gguf")
    export(tmp_path / "src", tmp_path / "x.gguf", "gguf", force=True)
    assert gguf.GGUFReader(tmp_path / "x.gguf").tensors
    with pytest.raises(FasttuneError, match="may not be the source folder"):
        export(tmp_path / "src", tmp_path / "src", "hf", force=True)
    with pytest.raises(FasttuneError, match="may not be the source folder"):
        export(tmp_path / "src", tmp_path, "hf", force=True)  # a folder holding the source
    with pytest.raises(FasttuneError, match="needs an adapter"):
        export(tmp_path / "src", tmp_path / "p", "peft")
    with pytest.raises(FasttuneError, match="use --format merged"):
        export(lora_run["adapter"], tmp_path / "p", "hf")
    with pytest.raises(FasttuneError, match="--quant applies to the gguf format"):
        export(tmp_path / "src", tmp_path / "p", "hf", quant="q8_0")
    with pytest.raises(FasttuneError, match="--dtype applies to the hf and merged"):
        export(tmp_path / "src", tmp_path / "p.gguf", "gguf", dtype="bf16")
    adapter_cfg = json.loads((lora_run["adapter"] / "adapter_config.json").read_text())
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(
        json.dumps({**adapter_cfg, "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"})
    )
    with pytest.raises(FasttuneError, match="base_model_name_or_path='Qwen/Qwen2.5-0.5B' is not a local"):
        export(tmp_path / "ad", tmp_path / "p", "merged")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


@needs_gguf
def test_cli_export(tmp_path, capsys):
    make_checkpoint(tmp_path / "src", "qwen3")
    out = tmp_path / "q.gguf"
    args = ["export", "--model", str(tmp_path / "src"), "--format", "gguf", "--out", str(out)]
    assert cli_main([*args, "--quant", "q8_0", "--name", "tiny"]) == 0
    assert f"wrote {out} (gguf, q8_0" in capsys.readouterr().out
    fields, _ = read_gguf(out)
    assert fields["general.name"] == "tiny" and fields["general.architecture"] == "qwen3"
    assert cli_main(args) == 2
    assert f"fasttune: error: {out}: already exists (use --force" in capsys.readouterr().err
