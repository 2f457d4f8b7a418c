"""`fasttune export --format gguf`: GGUF files that the gguf package reads back with every tensor exact
(f32, f16, bf16) or within Q8_0's error bound, with the metadata llama.cpp needs. The hf / peft / merged
folders are tests/test_export_folders.py's; when llama-cpp-python is installed, llama.cpp itself loads the
files and its tokens and logits are compared with ours (tests/test_export_llamacpp.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from export_helpers import (
    FAMILIES,
    FAMILY_PRE,
    Q8_SHAPES,
    T,
    dequantized,
    expected_tensors,
    gguf,
    make_checkpoint,
    needs_gguf,
    read_gguf,
    small_tokenizer,
)
from fasttune.errors import FasttuneError, TokenizerError
from fasttune.export.formats import export
from fasttune.export.gguf import (
    _LLAMA3_REGEX,
    _QWEN2_REGEX,
    gguf_tensor_name,
    interleave_rope_rows,
    llama3_rope_factors,
    pre_tokenizer_name,
)
from fasttune.models.model import rope_inv_freq
from fasttune.models.tokenizer import BUILTIN_DIR, load_tokenizer
from fasttune.models.weights import load_model
from helpers import FAMILIES as FAMILIES_CFG
from helpers import hf_model

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
