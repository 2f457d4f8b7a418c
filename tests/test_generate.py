"""Generation: the no-cache greedy reference, the KV cache against it and against transformers (and peft),
stop tokens, sampling, the repetition penalty, LoRA, loading, and `fasttune generate`."""

import json
import os
import shutil

import pytest
import torch
import transformers

import fasttune
from fasttune.cli.main import main
from fasttune.errors import ConfigError, FasttuneError
from fasttune.eval.generation import (
    KVCache,
    choose_next,
    greedy_nocache,
    load_for_generation,
    penalize_repetition,
    top_k_filter,
    top_p_filter,
)
from fasttune.models.lora import LoraConfig, apply_lora, save_adapter
from fasttune.models.tokenizer import write_builtin_tokenizer
from helpers import FAMILIES, hf_model, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LENGTHS = (5, 1, 13, 20)  # with 12 new tokens the longest row passes Mistral's window of 16


def _prompts(vocab, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    theirs = write_checkpoint(path, request.param)
    return request.param, path, fasttune.load_model(path), theirs


def _hf_generate(model, prompts, max_new_tokens, pad_id=0, **kwargs):
    """transformers' generate on a left-padded batch with its attention mask; the new tokens per prompt."""
    T0 = max(map(len, prompts))
    ids = torch.full((len(prompts), T0), pad_id)
    mask = torch.zeros(len(prompts), T0, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T0 - len(p) :] = torch.tensor(p)
        mask[i, T0 - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kwargs
        )
    return out[:, T0:].tolist()


def _cut(tokens, stop):
    """The tokens before the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


# ----------------------------------------------------------------------------------------------------------
# The no-cache reference


@pytest.mark.parametrize("family", ["qwen2_tied", "llama"])
def test_greedy_matches_transformers_and_stops_on_a_stop_token(tmp_path, family):
    write_checkpoint(tmp_path, family)
    ours = fasttune.load_model(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    prompt = [5, 17, 42, 8, 3]
    new = greedy_nocache(ours, prompt, 12, stop_ids=[])
    with torch.no_grad():
        out = theirs.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    assert new == out[0, len(prompt) :].tolist()
    stop = new[4]
    stopped = greedy_nocache(ours, prompt, 12, stop_ids=[stop])
    assert stopped == new[: new.index(stop) + 1]  # up to and including the first stop token


# ----------------------------------------------------------------------------------------------------------
# The KV cache


def test_cached_greedy_equals_the_nocache_reference(family_model):
    _, _, model, _ = family_model
    prompts = _prompts(model.config.vocab_size)
    new = fasttune.generate(model, prompts, max_new_tokens=12)
    assert new == [greedy_nocache(model, p, 12, []) for p in prompts]
    assert all(len(n) == 12 for n in new)


def test_cached_greedy_equals_transformers_left_padded_generate(family_model):
    family, _, model, theirs = family_model
    prompts = _prompts(model.config.vocab_size, seed=2)
    expected = _hf_generate(theirs, prompts, 12, do_sample=False, eos_token_id=None)
    assert fasttune.generate(model, prompts, max_new_tokens=12) == expected, family


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_every_cached_step_gives_the_full_forward_logits(tmp_path, family):
    """Prefill and decode logits of each left-padded row equal the row's own unpadded full forward."""
    write_checkpoint(tmp_path, family)
    model = fasttune.load_model(tmp_path)
    V = model.config.vocab_size
    rows = _prompts(V, lengths=(7, 2, 18), seed=3)
    steps = 6
    continuations = _prompts(V, lengths=(steps,) * 3, seed=4)
    cache = KVCache(model.config, 3, 18 + steps, torch.device("cpu"))
    with torch.no_grad():
        cu = cache.prefill([len(r) for r in rows])
        ids = torch.tensor([t for r in rows for t in r])[None]
        pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
        got = [model.lm_head(model(ids, pos, cache=cache)[0, cu[1:].long() - 1])]
        cache.commit()
        for s in range(steps):
            token = torch.tensor([c[s] for c in continuations])[:, None]
            pos = torch.tensor([[len(r) + s] for r in rows])
            cache.decode()
            got.append(model.lm_head(model(token, pos, cache=cache)[:, -1]))
            cache.commit()
        for b, r in enumerate(rows):
            full = model.logits(torch.tensor([r + continuations[b]]))[0]
            for s in range(steps + 1):
                torch.testing.assert_close(got[s][b], full[len(r) - 1 + s], atol=2e-5, rtol=1e-5)


def test_a_cache_needs_the_positions_of_the_new_tokens(tmp_path):
    write_checkpoint(tmp_path, "qwen2_tied")
    model = fasttune.load_model(tmp_path)
    cache = KVCache(model.config, 1, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.tensor([[1, 2]]), cache=cache)


def test_stop_tokens_end_rows_and_are_not_returned(family_model):
    _, _, model, theirs = family_model
    prompts = _prompts(model.config.vocab_size, seed=5)
    free = fasttune.generate(model, prompts, max_new_tokens=12)
    stop = {free[0][3], free[2][6]}
    stopped = fasttune.generate(model, prompts, max_new_tokens=12, stop_token_ids=sorted(stop))
    assert stopped == [_cut(f, stop) for f in free]
    assert len(stopped[0]) <= 3 and len(stopped[2]) <= 6
    # transformers with the stop tokens as eos (it pads finished rows; the stop token itself is kept)
    theirs_new = _hf_generate(theirs, prompts, 12, do_sample=False, eos_token_id=sorted(stop))
    assert stopped == [_cut(t, stop) for t in theirs_new]


def test_batching_and_order_do_not_change_greedy_results(tmp_path):
    write_checkpoint(tmp_path, "qwen2_untied")
    model = fasttune.load_model(tmp_path)
    prompts = _prompts(model.config.vocab_size, lengths=(9, 3, 14, 1, 6), seed=6)
    whole = fasttune.generate(model, prompts, max_new_tokens=8)
    assert fasttune.generate(model, prompts, max_new_tokens=8, batch_size=2) == whole
    assert fasttune.generate(model, prompts, max_new_tokens=8, batch_size=1) == whole
    assert fasttune.generate(model, prompts[::-1], max_new_tokens=8) == whole[::-1]
    assert fasttune.generate(model, prompts, max_new_tokens=0) == [[] for _ in prompts]
    assert fasttune.generate(model, [], max_new_tokens=8) == []


def test_triton_kernels_generate_as_the_references(tmp_path):
    """The Triton path (the default on CUDA: RoPE from per-row position_ids in the kernel), here through
    Triton's interpreter."""
    write_checkpoint(tmp_path, "qwen2_tied")
    ref = fasttune.load_model(tmp_path, kernels="torch")
    tri = fasttune.load_model(tmp_path, kernels="triton")
    prompts = _prompts(ref.config.vocab_size, lengths=(4, 9), seed=7)
    assert fasttune.generate(tri, prompts, max_new_tokens=3) == fasttune.generate(
        ref, prompts, max_new_tokens=3
    )


def test_training_mode_is_restored_and_dropout_is_off_while_generating(tmp_path):
    write_checkpoint(tmp_path, "llama")
    model = fasttune.load_model(tmp_path)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5, targets=("q_proj", "v_proj", "down_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    prompts = _prompts(model.config.vocab_size, seed=8)
    evaluated = fasttune.generate(model, prompts, max_new_tokens=6)
    model.train()
    assert fasttune.generate(model, prompts, max_new_tokens=6) == evaluated
    assert model.training and all(m.training for m in model.modules())


def test_bad_arguments_are_reported(tmp_path):
    write_checkpoint(tmp_path, "qwen2_tied")
    model = fasttune.load_model(tmp_path)
    with pytest.raises(FasttuneError, match="prompt 1 must be a non-empty list"):
        fasttune.generate(model, [[1, 2], []])
    with pytest.raises(
        FasttuneError, match=r"prompt 0 has token id 131 outside the model's vocabulary \[0, 131\)"
    ):
        fasttune.generate(model, [[1, 131]])
    with pytest.raises(FasttuneError, match="temperature must be >= 0.*top_p must be in"):
        fasttune.generate(model, [[1]], temperature=-1, top_p=0)
    with pytest.raises(FasttuneError, match="prompts must be a list"):
        fasttune.generate(model, "hello")


# ----------------------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible_and_top_k_1_or_tiny_top_p_is_greedy(tmp_path):
    write_checkpoint(tmp_path, "qwen3")
    model = fasttune.load_model(tmp_path)
    prompts = _prompts(model.config.vocab_size, seed=9)
    greedy = fasttune.generate(model, prompts, max_new_tokens=10)
    a = fasttune.generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3)
    assert a == fasttune.generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3)
    assert a != fasttune.generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=4)
    assert a != greedy  # 40 draws at temperature 1 from a random model: never all the argmax
    assert fasttune.generate(model, prompts, max_new_tokens=10, temperature=1.5, top_k=1, seed=0) == greedy
    assert fasttune.generate(model, prompts, max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([choose_next(logits, temperature=0.7, generator=g) for _ in range(n)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / n
    torch.testing.assert_close(freq, (logits[0] / 0.7).softmax(-1), atol=0.015, rtol=0)
    # top-k 2 then top-p 0.6 at temperature 1: probabilities of tokens 0 and 1 are 0.73 and 0.27 of the two,
    # so the nucleus is token 0 alone.
    draws = torch.stack([choose_next(logits, temperature=1.0, top_k=3, generator=g) for _ in range(2000)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}
    draws = torch.stack(
        [choose_next(logits, temperature=1.0, top_k=2, top_p=0.6, generator=g) for _ in range(200)]
    )
    assert set(draws.flatten().tolist()) == {0}


def test_repetition_penalty_by_hand_and_against_transformers():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.2]])
    seen = torch.tensor([[True, True, False, False, True]])
    # positive logits of seen tokens divided by 2, negative ones multiplied by 2; unseen ones unchanged
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.4]])
    assert torch.equal(penalize_repetition(logits, seen, 2.0), expected)
    # with a penalty of 2 the argmax stays 3; with 0.5 (a reward) seen token 0 wins: 2 / 0.5 = 4 > 3
    assert choose_next(logits, seen, repetition_penalty=2.0).item() == 3
    assert choose_next(logits, seen, repetition_penalty=0.5).item() == 0

    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    torch.testing.assert_close(penalize_repetition(scores, seen, 1.3), theirs, rtol=0, atol=0)


def test_top_k_and_top_p_filters_match_transformers():
    torch.manual_seed(0)
    scores = torch.randn(6, 97) * 2
    for k in (1, 5, 40):
        theirs = transformers.TopKLogitsWarper(k)(None, scores.clone())
        assert torch.equal(top_k_filter(scores, k), theirs)
    for p in (0.05, 0.5, 0.9, 0.99):
        theirs = transformers.TopPLogitsWarper(p)(None, scores.clone())
        assert torch.equal(top_p_filter(scores, p), theirs), p
    assert torch.equal(top_k_filter(scores, 0), scores) and torch.equal(top_p_filter(scores, 1.0), scores)


def test_greedy_with_a_repetition_penalty_matches_transformers(tmp_path):
    theirs = write_checkpoint(tmp_path, "qwen2_tied")
    model = fasttune.load_model(tmp_path)
    # equal lengths: transformers would also penalise the pad token of a padded row
    prompts = _prompts(model.config.vocab_size, lengths=(8, 8, 8), seed=10)
    expected = _hf_generate(theirs, prompts, 16, do_sample=False, eos_token_id=None, repetition_penalty=1.8)
    got = fasttune.generate(model, prompts, max_new_tokens=16, repetition_penalty=1.8)
    assert got == expected
    assert got != fasttune.generate(model, prompts, max_new_tokens=16)  # the penalty changed something


# ----------------------------------------------------------------------------------------------------------
# LoRA and loading


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A base folder (with a tokenizer), a LoRA model on it with non-zero adapters, and its saved adapter."""
    root = tmp_path_factory.mktemp("lora")
    theirs = write_checkpoint(root / "base", "qwen2_untied")
    write_builtin_tokenizer(root / "base")
    model = fasttune.load_model(root / "base")
    apply_lora(
        model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "k_proj", "o_proj", "up_proj"))
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    save_adapter(model, root / "adapter", base_model_path=str(root / "base"))
    return root, model, theirs


def test_lora_model_cached_greedy_equals_nocache_and_peft(lora_setup):
    import peft

    root, model, theirs = lora_setup
    prompts = _prompts(model.config.vocab_size, seed=11)
    new = fasttune.generate(model, prompts, max_new_tokens=10)
    assert new == [greedy_nocache(model, p, 10, []) for p in prompts]
    assert new != fasttune.generate(fasttune.load_model(root / "base"), prompts, max_new_tokens=10)
    peft_model = peft.PeftModel.from_pretrained(theirs, root / "adapter").eval()
    assert new == _hf_generate(peft_model, prompts, 10, do_sample=False, eos_token_id=None)


def test_load_for_generation_from_an_adapter_folder(lora_setup, tmp_path, monkeypatch):
    root, model, _ = lora_setup
    prompts = _prompts(model.config.vocab_size, seed=12)
    expected = fasttune.generate(model, prompts, max_new_tokens=8)
    for args in ((root / "adapter",), (root / "base", root / "adapter")):
        loaded, tok = load_for_generation(*args, device="cpu")
        assert fasttune.generate(loaded, prompts, max_new_tokens=8) == expected
        assert tok.stop_tokens[0] == "<|im_end|>"
    with pytest.raises(ConfigError, match="is an adapter folder"):
        load_for_generation(root / "adapter", adapter=root / "adapter")
    bad = tmp_path / "adapter"
    bad.mkdir()
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'Qwen/Qwen2.5-0.5B-Instruct' is not a local folder"):
        load_for_generation(bad)
    # a relative base path that is not under the working directory resolves against the adapter folder
    config["base_model_name_or_path"] = os.path.relpath(root / "base", bad)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    shutil.copy(root / "adapter" / "adapter_model.safetensors", bad)
    monkeypatch.chdir(tmp_path)
    loaded, _ = load_for_generation(bad, device="cpu")
    assert fasttune.generate(loaded, prompts, max_new_tokens=8) == expected


# ----------------------------------------------------------------------------------------------------------
# fasttune generate


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny random Qwen2 with Qwen2.5's vocabulary size and tokenizer, so chat-template ids fit."""
    path = tmp_path_factory.mktemp("chat")
    hf_model("qwen2_tied", vocab_size=151936).save_pretrained(path)
    write_builtin_tokenizer(path)
    return path


def _expected(path, texts, max_new_tokens, system="default"):
    """What `fasttune generate` should say, computed through the library."""
    from fasttune.data.packing import with_system_prompt

    model, tok = load_for_generation(path, device="cpu")
    prompts = [
        tok.apply_chat_template(with_system_prompt(m, system, tok), add_generation_prompt=True) for m in texts
    ]
    new = fasttune.generate(model, prompts, max_new_tokens=max_new_tokens, stop_token_ids=tok.stop_token_ids)
    return [tok.decode(n) for n in new], new


def test_cli_generates_for_prompt_arguments(chat_model, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(chat_model),
                "Hello there",
                "Tell me about rain",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    texts, _ = _expected(
        chat_model,
        [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "Tell me about rain"}]],
        5,
    )
    assert out == f"> Hello there\n{texts[0]}\n\n> Tell me about rain\n{texts[1]}\n\n"


def test_cli_reads_a_prompt_file_and_writes_jsonl(chat_model, tmp_path, capsys):
    lines = [
        {"input": "What is color?", "output": "A hue.", "id": 7},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rain?"}]},
        {"messages": [{"role": "user", "content": "Sun?"}, {"role": "assistant", "content": "Hot."}]},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "sub" / "answers.jsonl"
    args = ["generate", "--model", str(chat_model), "--file", str(prompts), "--out", str(out)]
    assert main([*args, "--max-new-tokens", "6", "--system-prompt", "none"]) == 0
    assert f"wrote 3 answers to {out}" in capsys.readouterr().out
    records = [json.loads(x) for x in out.read_text().splitlines()]
    conversations = [
        [{"role": "user", "content": "What is color?"}],
        lines[1]["messages"],
        [{"role": "user", "content": "Sun?"}],
    ]
    texts, ids = _expected(chat_model, conversations, 6, system="none")
    assert [r["output"] for r in records] == texts
    assert [r["new_tokens"] for r in records] == [len(i) for i in ids]
    assert [r["finish_reason"] for r in records] == ["stop" if len(i) < 6 else "length" for i in ids]
    assert (
        records[0]["input"] == "What is color?"
        and records[0]["reference"] == "A hue."
        and records[0]["id"] == 7
    )
    assert records[1]["messages"] == lines[1]["messages"] and "reference" not in records[1]
    assert records[2]["messages"] == conversations[2] and records[2]["reference"] == "Hot."
    assert sorted(p.name for p in out.parent.iterdir()) == ["answers.jsonl"]  # no temporary file left


def test_cli_samples_reproducibly_and_reports_bad_input(chat_model, tmp_path, capsys):
    base = ["generate", "--model", str(chat_model), "Hi", "--max-new-tokens", "8", "--temperature", "0.9"]
    assert main([*base, "--seed", "1", "--top-k", "50", "--top-p", "0.9"]) == 0
    first = capsys.readouterr().out
    assert main([*base, "--seed", "1", "--top-k", "50", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out == first
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"input": "fine"}\n{"prompt": "x"}\nnot json\n'
        '{"messages": [{"role": "assistant", "content": "a"}]}\n'
    )
    assert main(["generate", "--model", str(chat_model), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: no 'input' or 'messages' field (keys: prompt)" in err
    assert f"{bad}:3: invalid JSON" in err
    assert f"{bad}:4: 'messages' must end with a user message" in err
    assert main(["generate", "--model", str(chat_model)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main([*base, "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--dtype", "fp8"]) == 2
    assert "unknown dtype 'fp8'" in capsys.readouterr().err
    assert main([*base, "--device", "gpu"]) == 2
    assert "device 'gpu' is not a device" in capsys.readouterr().err
