"""The exported GGUF files in llama.cpp itself (through llama-cpp-python, when it is installed; it is not
in the dev extra because it compiles llama.cpp: `pip install llama-cpp-python==0.3.36`).

- f32 files: llama.cpp's logits equal ours (fp32) for every family, and greedy decoding agrees. This is
  what proves the layout: tensor names, Llama's q/k row order for its RoPE, Llama 3.1's rope_freqs,
  Qwen3's head size, tied heads, and every hyperparameter llama.cpp reads.
- bf16 and q8_0 files: llama.cpp rounds the input of every matrix product to the weight's type (bf16, or
  Q8_0 blocks of 32 with their own scale). With the same rounding applied in our model, on the weights
  read back from the file, the logits agree to fp32 precision except where one activation lies within
  fp32 noise of a rounding boundary and the two programs round it to different sides (measured: such a
  flip at one or two positions in 48, changing logits by ~1e-2; every other position agrees to ~1e-6).
- Tokenizer: llama.cpp's tokenization with the GGUF's vocabulary, merges and pre-tokenizer name equals
  the `tokenizers` library's for Qwen2.5's real tokenizer (the 47 reference strings) and for BPEs split
  by Llama 3's and GPT-2's rules; the chat template read back from the file renders our prompt.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttune.export.formats import export
from fasttune.export.gguf import gguf_tensor_name
from fasttune.models.tokenizer import load_tokenizer
from fasttune.models.weights import load_model
from helpers import FIXTURES, hf_model
from test_export import LINEAR_ROPE, make_checkpoint, small_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package is an optional dependency (pip install gguf)")
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36 builds it)"
)

ARCH = {"qwen2_tied": "qwen2", "qwen2_untied": "qwen2", "qwen3": "qwen3", "llama": "llama"}
F32 = 0  # GGML_TYPE_F32: an fp32 KV cache, so that attention adds no rounding of its own


def run_llama_cpp(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(
        str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1, type_k=F32, type_v=F32
    )
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)])
    llm.close()
    return scores


def prompt_ids(vocab_size: int, n: int = 48) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", [*ARCH, "qwen2_untied+linear_rope"])
def test_llama_cpp_f32_logits_and_greedy_equal_ours(tmp_path, family):
    family, _, variant = family.partition("+")
    make_checkpoint(tmp_path / "src", family, **(LINEAR_ROPE if variant else {}))
    out = export(tmp_path / "src", tmp_path / "m.gguf", "gguf", quant="f32")
    ours = load_model(tmp_path / "src")
    ids = prompt_ids(ours.config.vocab_size)
    with torch.no_grad():
        ref = ours.logits(torch.tensor([ids]))[0].numpy()
    got = run_llama_cpp(out, ids)
    assert got.shape == ref.shape
    # fp32 on both sides, summed in different orders: measured up to 7e-6 on logits of magnitude ~5.
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)

    # Greedy decoding, 12 tokens from an 8-token prompt, by each program on its own.
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False, n_threads=1, type_k=F32, type_v=F32)
    theirs = []
    for tok in llm.generate(ids[:8], top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(tok)
        if len(theirs) == 12:
            break
    llm.close()
    seq = list(ids[:8])
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(ours.logits(torch.tensor([seq]))[0, -1].argmax()))
    assert theirs == seq[8:]


def with_file_weights(model, path, arch: str):
    """`model` with every weight replaced by the file's, dequantised (Llama's q/k rows put back in
    Hugging Face order)."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    cfg = model.config
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            t = tensors[gguf_tensor_name(name)]
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(p.shape)
            if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
                n = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
                w = w.reshape(n, p.shape[0] // n // 2, 2, *p.shape[1:]).transpose(1, 2).reshape(p.shape)
            p.copy_(w)
    return model


def round_matmul_inputs(model, quant: str):
    """Round each linear layer's input as llama.cpp's CPU matmul does for that weight type: to bf16 (round
    to nearest even), or to Q8_0 (per block of 32: scale max|x|/127, integers, scale in fp16)."""
    Q8_0 = gguf.GGMLQuantizationType.Q8_0

    def hook(module, args):
        x = args[0]
        if quant == "bf16":
            return (x.to(torch.bfloat16).float(),)
        q = gguf.quants.quantize(x.contiguous().numpy().astype(np.float32), Q8_0)
        return (torch.from_numpy(gguf.quants.dequantize(q, Q8_0).copy()).reshape(x.shape),)

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook)
    return model


@pytest.mark.parametrize("quant", ["bf16", "q8_0"])
@pytest.mark.parametrize("family", list(ARCH))
def test_llama_cpp_bf16_q8_0_compute_what_the_file_says(tmp_path, family, quant):
    make_checkpoint(tmp_path / "src", family)
    out = export(tmp_path / "src", tmp_path / "m.gguf", "gguf", quant=quant)
    ours = round_matmul_inputs(with_file_weights(load_model(tmp_path / "src"), out, ARCH[family]), quant)
    ids = prompt_ids(ours.config.vocab_size)
    with torch.no_grad():
        ref = ours.logits(torch.tensor([ids]))[0].numpy()
    got = run_llama_cpp(out, ids)
    exact = (np.abs(got - ref) <= 1e-4 + 1e-4 * np.abs(ref)).all(axis=-1)  # per position
    # The first position has no history: any disagreement there would be the weights or the rounding.
    assert exact[0]
    # A rounding flip changes its position and, through the KV cache, the later ones: most stay exact.
    assert exact.mean() >= 0.5, np.flatnonzero(~exact)
    # Without the emulated rounding the same comparison fails: the test sees llama.cpp's rounding.
    plain = with_file_weights(load_model(tmp_path / "src"), out, ARCH[family])
    with torch.no_grad():
        unrounded = plain.logits(torch.tensor([ids]))[0].numpy()
    assert not np.allclose(got, unrounded, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def vocab_only(path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def reference_strings() -> list[str]:
    text = (FIXTURES / "qwen2-tokenizer-vectors" / "strings.txt").read_text(encoding="utf-8")
    strings = text.split("\n__ggml_vocab_test__\n")
    strings[-1] = strings[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    return strings


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Count: 1234567, then say 'it's done'."},
    {"role": "assistant", "content": "1234567 — it's done!"},
]


def test_llama_cpp_tokenizes_like_qwen25(tmp_path, qwen_tokenizer_dir):
    src = tmp_path / "src"
    hf_model("qwen2_untied", vocab_size=151936, bos_token_id=151643).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((qwen_tokenizer_dir / f).read_bytes())
    out = export(src, tmp_path / "m.gguf", "gguf")
    tok = load_tokenizer(src)
    llm = vocab_only(out)
    strings = reference_strings()
    ids_lines = (FIXTURES / "qwen2-tokenizer-vectors" / "ids.txt").read_text().split("\n")[: len(strings)]
    assert len(strings) == 47
    for s, line in zip(strings, ids_lines, strict=True):
        want = [int(x) for x in line.split()]
        assert tok.encode(s) == want, repr(s)
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == want, repr(s)
    text = tok.render(CHAT)
    ids = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids  # control tokens parsed, no bos
    assert llm.detokenize(ids, special=True).decode() == text
    assert llm.token_eos() == 151645 and llm.token_bos() == 151643
    # The chat template llama.cpp read from the file renders our prompt (llama-cpp-python's renderer).
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    assert template == tok.chat_template
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    assert formatter(messages=CHAT[:2]).prompt == tok.render(CHAT[:2], add_generation_prompt=True)
    llm.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2"])
def test_llama_cpp_tokenizes_like_other_byte_level_bpes(tmp_path, pre):
    tok = small_tokenizer(pre)
    hf_model("llama", vocab_size=tok.vocab_size).save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src")
    out = export(tmp_path / "src", tmp_path / "m.gguf", "gguf")
    llm = vocab_only(out)
    texts = reference_strings() + [tok.render(CHAT), "12345 6789 1 22 333 4444, it's I've   spaced\n\n\tout"]
    for s in texts:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s), repr(s)
    # The rules split digits differently (Qwen2's one by one, Llama 3's in threes, GPT-2's not at all): the
    # pre-tokenizer name is what tells llama.cpp which, and these strings would catch a wrong one.
    assert [tok.decode([i]) for i in tok.encode("12345")] == {"llama-bpe": ["123", "45"], "gpt-2": ["12345"]}[
        pre
    ]
    llm.close()
