"""Tokenization with prompt masks, memory-mapped storage, best-fit-decreasing packing, packed batches and
the resumable sampler."""

import numpy as np
import pytest
import torch

import fasttune
from fasttune.data.packing import (
    PackedSampler,
    TokenizedData,
    TokenizeOptions,
    collate,
    pack_bfd,
    packing_efficiency,
    padded_efficiency,
    tokenize,
)
from fasttune.data.records import DataError, Example
from fasttune.models.model import ModelConfig
from fasttune.models.tokenizer import builtin_tokenizer
from helpers import hf_model


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def ex(prompt, output, line=1, weight=1.0):
    return Example(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}],
        {},
        "f.jsonl",
        line,
        f'{{"line": {line}}}',
        weight,
    )


EXAMPLES = [
    ex("Tell me something about color.", "Colors fade, but kindness stays bright.", 1),
    ex("Share a proverb about bread.", "Bread shared is bread doubled.", 2),
    ex("Give me a saying.", "Still water runs deep.", 3),
]


def test_tokenize_masks_the_prompt_and_trains_the_end_token(tok):
    data, problems = tokenize(EXAMPLES, tok, TokenizeOptions())
    assert not problems and len(data) == 3 and list(data.index) == [0, 1, 2]
    for e, i in zip(EXAMPLES, range(3), strict=True):
        ids, mask = data.sequence(i)
        assert list(ids) == tok.encode_chat(e.messages).ids
        assert tok.decode(ids[mask.astype(bool)]) == e.response + "<|im_end|>"
    assert data.meta["num_targets"] == int(data.mask.sum())  # no first token is trained
    everything, _ = tokenize(EXAMPLES, tok, TokenizeOptions(train_on_input=True))
    assert everything.mask.all()


def test_system_prompt_options(tok):
    def text(option):
        data, _ = tokenize(EXAMPLES[:1], tok, TokenizeOptions(system_prompt=option))
        return tok.decode(data.sequence(0)[0])

    assert "You are Qwen, created by Alibaba Cloud" in text("default")
    assert text("none").startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user")  # shortest possible
    assert text("You keep proverbs.").startswith("<|im_start|>system\nYou keep proverbs.<|im_end|>")
    own = Example([{"role": "system", "content": "Mine."}] + EXAMPLES[0].messages)
    data, _ = tokenize([own], tok, TokenizeOptions(system_prompt="none"))
    assert tok.decode(data.sequence(0)[0]).startswith("<|im_start|>system\nMine.<|im_end|>")


def test_too_long_policies(tok):
    lengths = tokenize(EXAMPLES, tok, TokenizeOptions())[0].lengths
    cut = int(lengths[1]) - 3  # example 2 is too long, and truncation keeps some of its response
    data, problems = tokenize(EXAMPLES, tok, TokenizeOptions(max_seq_len=int(lengths.max()) - 1))
    longest = int(np.argmax(lengths))
    assert len(data) == 2 and longest not in data.index
    assert problems[0].line == longest + 1 and "longer than max_seq_len" in problems[0].reason
    with pytest.raises(DataError, match="f.jsonl:.*longer than max_seq_len"):
        tokenize(EXAMPLES, tok, TokenizeOptions(max_seq_len=cut, too_long="error"))
    data, problems = tokenize(EXAMPLES[1:2], tok, TokenizeOptions(max_seq_len=cut, too_long="truncate"))
    assert data.lengths[0] == cut and not problems
    prompt_only = int(lengths[1]) - len(tok.encode(EXAMPLES[1].response)) - 2
    data, problems = tokenize(
        EXAMPLES[1:2], tok, TokenizeOptions(max_seq_len=prompt_only, too_long="truncate")
    )
    assert len(data) == 0 and "no trainable token" in problems[0].reason


def test_saved_data_loads_memory_mapped(tok, tmp_path):
    data, _ = tokenize([ex("a", "b", weight=2.0)] + EXAMPLES, tok, TokenizeOptions())
    data.save(tmp_path / "train")
    data.save(tmp_path / "train")  # over an existing one
    loaded = TokenizedData.load(tmp_path / "train")
    assert isinstance(loaded.ids, np.memmap)
    for name in ("ids", "mask", "offsets", "index", "weight"):
        assert np.array_equal(getattr(loaded, name), getattr(data, name))
    assert loaded.meta == data.meta and [p.name for p in tmp_path.iterdir()] == ["train"]
    (tmp_path / "train" / "mask.npy").unlink()
    with pytest.raises(DataError, match="not a tokenized dataset \\(mask.npy is missing\\)"):
        TokenizedData.load(tmp_path / "train")


def test_bfd_loses_nothing_respects_the_budget_and_fills_bins():
    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 90, size=5000)
    bins = pack_bfd(lengths, 2048, seed=0)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(5000))
    assert max(int(lengths[b].sum()) for b in bins) <= 2048
    assert packing_efficiency(lengths, bins, 2048) > 0.98
    assert padded_efficiency(lengths, 32) < 0.8  # padding to the longest of 32 wastes a quarter
    assert sorted(map(sorted, pack_bfd(np.array([6, 5, 4, 3, 2]), 10))) == [[0, 2], [1, 3, 4]]
    with pytest.raises(DataError, match="example 1 has 11 tokens, more than the packing budget of 10"):
        pack_bfd(np.array([3, 11]), 10)


def _token_data(lens, vocab, seed=0):
    """TokenizedData of random ids, with the first third of each sequence untrained (a 'prompt')."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=sum(lens)).astype(np.uint32)
    mask = np.concatenate([np.arange(n) >= n // 3 for n in lens]).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return TokenizedData(ids, mask, offsets, np.arange(len(lens)))


def test_collate_shifts_targets_within_each_sequence():
    data = _token_data([5, 9, 4], vocab=50)
    batch = collate(data, [2, 0, 1], pad_to=24, pad_id=49)
    assert batch.input_ids.shape == batch.targets.shape == batch.position_ids.shape == (1, 24)
    assert batch.cu_seqlens.tolist() == [0, 4, 9, 18, 24] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 9 and batch.num_sequences == 3 and batch.num_tokens == 18
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4] + list(range(9)) + list(range(6))
    t, x = batch.targets[0], batch.input_ids[0]
    for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), strict=True):
        assert t[e - 1] == -100  # the last token of a sequence predicts nothing across the boundary
        for k in range(s, e - 1):
            assert t[k] in (-100, x[k + 1])
    assert (t[18:] == -100).all() and (x[18:] == 49).all()
    # exactly the trained tokens after each sequence's first are targets
    assert batch.num_targets == int((t != -100).sum())
    expected = sum(int(data.sequence(i)[1][1:].sum()) for i in (0, 1, 2))
    assert batch.num_targets == expected
    with pytest.raises(DataError, match="18 tokens do not fit in a row of 10"):
        collate(data, [0, 1, 2], pad_to=10)


def test_packed_loss_equals_token_weighted_mean_of_sequence_losses():
    ref = hf_model("qwen2_tied")
    model = fasttune.CausalLM(ModelConfig.from_hf(ref.config.to_dict()))
    model.load_state_dict(ref.state_dict(), strict=False)
    lens = [7, 12, 5, 9]
    data = _token_data(lens, vocab=ref.config.vocab_size, seed=1)
    batch = collate(data, [0, 1, 2, 3], pad_to=40)
    with torch.no_grad():
        packed = model.loss(
            batch.input_ids, batch.targets, batch.position_ids, batch.cu_seqlens, batch.max_seqlen
        )
        losses, counts = [], []
        for i in range(4):
            one = collate(data, [i])
            losses.append(model.loss(one.input_ids, one.targets).item())
            counts.append(one.num_targets)
    expected = sum(l * c for l, c in zip(losses, counts, strict=True)) / sum(counts)
    assert abs(packed.item() - expected) < 1e-5
    assert batch.num_targets == sum(counts)


def test_sampler_is_deterministic_and_resumes_exactly():
    lengths = np.random.default_rng(0).integers(10, 60, size=400)
    run = PackedSampler(lengths, 256, seed=3)
    epoch0 = list(run)
    epoch1 = list(run)
    assert sorted(i for b in epoch0 for i in b) == list(range(400)) and epoch0 != epoch1
    assert list(PackedSampler(lengths, 256, seed=3)) == epoch0
    assert list(PackedSampler(lengths, 256, seed=4)) != epoch0

    first = PackedSampler(lengths, 256, seed=3)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    resumed = PackedSampler(lengths, 256, seed=3)
    resumed.load_state_dict(state)
    assert head + list(resumed) == epoch0
    assert list(resumed) == epoch1  # and the next epoch too
    with pytest.raises(DataError, match="saved with seed 3, this run uses 9"):
        PackedSampler(lengths, 256, seed=9).load_state_dict(state)


def test_sampler_weights_repeat_examples():
    lengths = np.full(100, 10)
    weights = np.array([2.0] * 50 + [0.5] * 50)
    seen = np.bincount([i for b in PackedSampler(lengths, 100, weights=weights) for i in b], minlength=100)
    assert (seen[:50] == 2).all() and set(seen[50:]) <= {0, 1} and 10 < seen[50:].sum() < 40
