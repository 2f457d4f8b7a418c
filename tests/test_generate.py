"""The no-cache greedy reference against transformers' greedy `generate`."""

import pytest
import torch
import transformers

import fasttune
from conftest import write_checkpoint
from fasttune.generate import greedy_nocache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
