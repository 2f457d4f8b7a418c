"""Model parity against transformers on tiny random checkpoints of every supported family: logits, loss and
every parameter gradient in fp32; packed sequences give each sequence the logits it gets alone."""

import pytest
import torch

import fasttune
from fasttune.models.kernels import apply_kernels
from fasttune.models.model import ModelConfig, default_position_ids
from helpers import FAMILIES, hf_model, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=sorted(FAMILIES))
def pair(request, tmp_path):
    """(family, transformers model, fasttune model) with identical fp32 weights."""
    ref = write_checkpoint(tmp_path, request.param)
    return request.param, ref, fasttune.load_model(tmp_path, dtype=torch.float32)


def test_logits_match_transformers(pair):
    family, ref, ours = pair
    ids = torch.randint(0, ref.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours.logits(ids)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5, family


def test_loss_and_every_gradient_match_transformers(pair):
    family, ref, ours = pair
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, ref.config.vocab_size, (2, 29), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a masked prompt
    labels[1, 20:] = -100
    # fasttune takes targets already shifted: targets[t] is the token after input_ids[t].
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)

    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    loss = ours.loss(ids, targets)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())

    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    our_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert our_grads.keys() == ref_grads.keys(), family
    for name, g_ref in ref_grads.items():
        assert our_grads[name] is not None, name
        assert rel_err(our_grads[name], g_ref) < 1e-4, (family, name)


def _pack(seqs):
    ids = torch.cat(seqs).unsqueeze(0)
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    return ids, pos, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sequences_match_running_each_alone(pair, dtype):
    family, ref, ours = pair
    ours = ours.to(dtype)
    # Not bit-exact: the GEMMs block differently for 37 rows than for 5. fp32 stays at rounding level.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    g = torch.Generator().manual_seed(3)
    lens = [5, 11, 1, 20]  # the last is longer than Mistral's window of 16
    seqs = [torch.randint(0, ref.config.vocab_size, (n,), generator=g) for n in lens]
    ids, pos, cu = _pack(seqs)
    with torch.no_grad():
        packed = ours.logits(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max(lens))[0]
        for s, e, seq in zip(cu[:-1], cu[1:], seqs, strict=True):
            alone = ours.logits(seq.unsqueeze(0))[0]
            assert rel_err(packed[s:e].float(), alone.float()) < tol
            if dtype == torch.float32:
                assert rel_err(alone, ref(seq.unsqueeze(0)).logits[0]) < 1e-5
        # position_ids default to restarting at each cu_seqlens boundary
        assert torch.equal(default_position_ids(ids, cu), pos)
        torch.testing.assert_close(ours.logits(ids, cu_seqlens=cu)[0], packed, rtol=0, atol=0)
        # and without cu_seqlens the sequences would see each other: the test can tell the difference.
        # (forward and the head, not `logits`: `logits` now reads the restarts in pos as packed sequences)
        crossed = ours.lm_head(ours(ids, position_ids=pos))[0, 5:16]
        assert rel_err(crossed.float(), packed[5:16].float()) > tol


def test_packed_loss_is_token_weighted_mean_of_sequence_losses(pair):
    _, ref, ours = pair
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, ref.config.vocab_size, (n,), generator=g) for n in (6, 13, 9)]
    ids, pos, cu = _pack(seqs)
    # Shifted targets never cross a boundary: the last token of each sequence predicts nothing.
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs]).unsqueeze(0)
    with torch.no_grad():
        packed = ours.loss(ids, targets, position_ids=pos, cu_seqlens=cu)
        losses = [ours.loss(s[None], torch.cat([s[1:], torch.tensor([-100])])[None]) for s in seqs]
    weights = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.float32)
    expected = (torch.stack(losses) * weights).sum() / weights.sum()
    assert abs(packed.item() - expected.item()) < 1e-5


def test_tied_head_shares_the_embedding():
    ref = hf_model("qwen2_tied")
    cfg = ModelConfig.from_hf(ref.config.to_dict())
    model = fasttune.CausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())


def test_packed_input_needs_batch_one(pair):
    _, _, ours = pair
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch size 1"):
        ours(ids, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


def test_bad_cu_seqlens_is_an_error(pair):
    _, _, ours = pair
    with pytest.raises(ValueError, match="cu_seqlens"):
        ours(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


def test_config_parsing_follows_transformers_defaults():
    base = dict(
        vocab_size=10, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4
    )
    q3 = ModelConfig.from_hf({"model_type": "qwen3", **base})
    assert q3.head_dim == 128 and q3.num_key_value_heads == 4 and q3.qk_norm and not q3.qkv_bias
    q2 = ModelConfig.from_hf({"model_type": "qwen2", **base, "rope_theta": 1e6, "sliding_window": 8})
    assert q2.head_dim == 16 and q2.qkv_bias and not q2.o_bias and q2.rope_theta == 1e6
    assert q2.sliding_window is None  # Qwen2 ignores the window unless use_sliding_window is set
    ll = ModelConfig.from_hf(
        {"model_type": "llama", **base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    )
    assert ll.rope_theta == 5e5 and ll.rope_scaling is None and not ll.tie_word_embeddings
    assert ModelConfig.from_hf({"model_type": "llama", **base, "attention_bias": True}).o_bias


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    cfg = ModelConfig.from_hf(
        dict(
            model_type="qwen2",
            vocab_size=10,
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            rope_theta=1e6,
        )
    )
    fp32 = fasttune.CausalLM(cfg).model.inv_freq
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)):
        model = cast(fasttune.CausalLM(cfg))
        assert model.model.embed_tokens.weight.dtype != torch.float32
        assert model.model.inv_freq.dtype == torch.float32
        assert torch.equal(model.model.inv_freq, fp32)


# -- the Triton kernels against the PyTorch references, through the whole model ----------------------------


@pytest.mark.parametrize("family", ["qwen2_tied", "qwen3", "llama", "mistral"])
@pytest.mark.parametrize("lora", [False, True])
def test_triton_kernels_match_the_references_in_the_whole_model(tmp_path, family, lora):
    from fasttune.models.lora import LoraConfig, apply_lora

    write_checkpoint(tmp_path, family)
    models = {k: fasttune.load_model(tmp_path, dtype=torch.float32, kernels=k) for k in ("torch", "triton")}
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, models["torch"].config.vocab_size, (n,), generator=g) for n in (9, 20, 4)]
    ids, pos, cu = _pack(seqs)
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs]).unsqueeze(0)
    results = {}
    for name, model in models.items():
        if lora:
            torch.manual_seed(0)  # the same A (kaiming) and B draws for both models
            apply_lora(model, LoraConfig(r=4, dropout=0.0))
            for m in model.modules():
                if hasattr(m, "lora_B"):
                    torch.nn.init.normal_(m.lora_B.weight, std=0.1)
            apply_kernels(model, name)
        assert all(m.kernels == name for m in model.modules() if hasattr(m, "kernels"))
        logits = model.logits(ids, pos, cu)
        loss = model.loss(ids, targets, pos, cu)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (logits.detach(), loss.detach(), grads)
    (l_ref, loss_ref, g_ref), (l_tri, loss_tri, g_tri) = results["torch"], results["triton"]
    assert rel_err(l_tri, l_ref) < 1e-5
    assert abs(loss_tri.item() - loss_ref.item()) < 1e-5 * abs(loss_ref.item())
    assert g_tri.keys() == g_ref.keys() and len(g_ref) > 0
    for n in g_ref:
        assert rel_err(g_tri[n], g_ref[n]) < 1e-4, n


def test_kernel_choice_is_logged_and_triton_where_it_cannot_run_is_an_error(tmp_path, caplog, monkeypatch):
    from fasttune.ops import choose_kernels

    assert choose_kernels("auto", torch.device("cpu"))[0] == "torch"
    assert "no CUDA device" in choose_kernels("auto", torch.device("cpu"))[1]
    assert choose_kernels("torch", torch.device("cpu")) == ("torch", "requested")
    assert choose_kernels("triton", torch.device("cpu"))[0] == "triton"  # the interpreter is on in tests
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="kernels='triton' needs a CUDA device"):
        choose_kernels("triton", torch.device("cpu"))
    write_checkpoint(tmp_path, "llama")
    with caplog.at_level("INFO", logger="fasttune"):
        fasttune.load_model(tmp_path)
    assert "kernels: torch (auto: no CUDA device" in caplog.text
    with pytest.raises(ValueError, match="kernels must be one of"):
        choose_kernels("cuda", torch.device("cpu"))
