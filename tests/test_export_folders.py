"""`fasttune export --format hf|peft|merged` (and gguf of an adapter): folders that transformers and peft
load with the logits of the model they came from; what export refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export_helpers import (
    IDS,
    expected_tensors,
    gguf,
    make_checkpoint,
    needs_gguf,
    read_gguf,
)
from fasttune.cli.main import main as cli_main
from fasttune.errors import FasttuneError
from fasttune.export.formats import export
from fasttune.models.lora import LoraConfig, apply_lora, save_adapter
from fasttune.models.tokenizer import load_tokenizer
from fasttune.models.weights import load_model

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
