"""LoRA: the layer's math against a hand computation in fp64, freezing and fp32 adapters, parity with PEFT in
both directions (fasttune saves / PEFT loads, PEFT saves / fasttune loads), merging into a folder that
transformers loads, and one clear error for each kind of bad config or adapter folder."""

import json
import math
import warnings

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import fasttune
from fasttune.errors import CheckpointError, ConfigError
from fasttune.models.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from fasttune.models.model import CausalLM
from helpers import write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
IDS = torch.tensor([[3, 17, 42, 5, 99, 0, 64, 21, 8], [7, 1, 2, 88, 30, 11, 9, 4, 50]])
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomise(model, seed=1, std=0.2):
    """Random A and B (B is zero when fresh, which would make every parity test pass trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model):
    with torch.no_grad():
        out = model.logits(IDS) if isinstance(model, CausalLM) else model(IDS).logits
    return out.float()


@pytest.fixture
def base_dir(tmp_path):
    write_checkpoint(tmp_path / "base", "qwen2_tied")
    return tmp_path / "base"


# ----------------------------------------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_adapter_changes_nothing(base_dir, dtype):
    model = fasttune.load_model(base_dir, dtype=dtype)
    before = logits(model)
    targets = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert len(targets) == 2 * 7
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_layer_matches_hand_computation_in_fp64():
    torch.manual_seed(0)
    base = nn.Linear(20, 12, bias=True)
    layer = LoraLinear(base, r=4, alpha=6, dropout=0.3).eval()
    assert layer.scaling == 1.5
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    x = torch.randn(3, 5, 20)
    W, b = base.weight.double(), base.bias.double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    expected = x.double() @ W.T + b + 1.5 * x.double() @ A.T @ B.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.merged_weight().double(), W + 1.5 * B @ A, rtol=1e-6, atol=1e-6)
    assert layer.merged_weight().dtype == torch.float32


def test_dropout_only_in_training_and_only_on_the_adapter_path():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 32), r=8, alpha=16, dropout=0.5)
    x = torch.randn(4, 64)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        # B = 0: the output is the base output exactly, in training too, so x itself is never dropped.
        torch.testing.assert_close(layer.train()(x), base_out, rtol=0, atol=0)
        nn.init.normal_(layer.lora_B.weight)
        clean = layer.base_layer(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
        torch.testing.assert_close(layer.eval()(x), clean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
        layer.train()
        a, b = layer(x), layer(x)
    assert not torch.allclose(a, clean) and not torch.allclose(a, b)
    # Inverted dropout keeps the expectation: averaged over many masks the update matches eval's.
    with torch.no_grad():
        mean = torch.stack([layer(x) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, clean, rtol=0.1, atol=0.15)


# ----------------------------------------------------------------------------------------------------------
# Freezing, dtypes, gradients


def test_only_adapters_train_and_are_fp32_on_a_bf16_model(base_dir):
    model = fasttune.load_model(base_dir, dtype=torch.bfloat16)
    base_total = model.num_parameters()
    targets = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    assert {id(p) for p in lora_parameters(model)} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), name
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in dict(model.named_parameters())
    n_adapter = sum(
        4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoraLinear)
    )
    assert count_parameters(model) == (n_adapter, base_total + n_adapter)

    randomise(model)  # with B = 0, A's gradient would be zero
    model.train()
    targets_ids = torch.roll(IDS, -1, dims=1)
    loss = model.loss(IDS, targets_ids)
    assert loss.dtype == torch.float32
    loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_apply_lora_targets_only_the_named_layers(base_dir):
    model = fasttune.load_model(base_dir)
    targets = apply_lora(model, LoraConfig(r=2, targets=["v_proj", "q_proj", "down_proj"]))
    assert targets == sorted(
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert model.info.lora_targets == targets
    assert model.info.lora_config.targets == ("v_proj", "q_proj", "down_proj")
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].self_attn.k_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, LoraLinear)
    assert not any(p.requires_grad for p in model.model.embed_tokens.parameters())
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        apply_lora(model, LoraConfig())


def test_apply_lora_on_the_meta_device(base_dir):
    cfg = fasttune.models.weights.read_config(base_dir)
    with torch.device("meta"):
        model = CausalLM(cfg).to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4))
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.is_meta and q.lora_B.weight.is_meta
    assert q.lora_A.weight.dtype == torch.float32 and q.base_layer.weight.dtype == torch.bfloat16
    assert q.lora_A.weight.shape == (4, cfg.hidden_size) and q.lora_B.weight.shape == (q.out_features, 4)


# ----------------------------------------------------------------------------------------------------------
# Parity with PEFT


@pytest.mark.parametrize("family", ["qwen2_tied", "qwen3", "llama"])
def test_fasttune_adapter_loads_in_peft(tmp_path, family):
    write_checkpoint(tmp_path / "base", family)
    ours = fasttune.load_model(tmp_path / "base")
    base_logits = logits(ours)
    apply_lora(ours, LoraConfig(r=4, alpha=12, dropout=0.1))
    randomise(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert [str(w.message) for w in caught if "peft" in w.filename] == []
    assert theirs.peft_config["default"].r == 4 and theirs.peft_config["default"].lora_alpha == 12
    ours_logits = logits(ours)
    assert not torch.allclose(ours_logits, base_logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(ours_logits, logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "family, targets",
    [
        ("qwen2_tied", list(ALL)),
        ("qwen3", ["q_proj", "v_proj", "down_proj"]),
        ("llama", ["o_proj", "up_proj"]),
    ],
)
def test_peft_adapter_loads_in_fasttune(tmp_path, family, targets):
    write_checkpoint(tmp_path / "base", family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    cfg = peft.LoraConfig(r=3, lora_alpha=7, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, cfg)
    randomise(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()

    ours = fasttune.load_model(tmp_path / "base")
    names = load_adapter(ours, tmp_path / "adapter")
    assert {n.rpartition(".")[2] for n in names} == set(targets)
    assert len(names) == len(targets) * ours.config.num_hidden_layers
    assert ours.info.lora_config == LoraConfig(r=3, alpha=7, dropout=0.05, targets=tuple(sorted(targets)))
    ours.eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_load_adapter_into_a_model_with_matching_adapters(tmp_path, base_dir):
    src = fasttune.load_model(base_dir)
    apply_lora(src, LoraConfig(r=4, alpha=8))
    randomise(src)
    save_adapter(src, tmp_path / "adapter")
    resumed = fasttune.load_model(base_dir)
    apply_lora(resumed, LoraConfig(r=4, alpha=8, dropout=0.2))
    load_adapter(resumed, tmp_path / "adapter")
    for key, t in lora_state_dict(src).items():
        torch.testing.assert_close(lora_state_dict(resumed)[key], t, rtol=0, atol=0)
    assert resumed.info.lora_config.dropout == 0.2  # the training run's own dropout stays
    other = fasttune.load_model(base_dir)
    apply_lora(other, LoraConfig(r=8, alpha=8))
    with pytest.raises(CheckpointError, match="already has LoRA adapters"):
        load_adapter(other, tmp_path / "adapter")


# ----------------------------------------------------------------------------------------------------------
# Merging


@pytest.mark.parametrize("family", ["qwen2_tied", "llama"])
def test_merge_then_save_loads_in_transformers(tmp_path, family):
    write_checkpoint(tmp_path / "base", family)
    model = fasttune.load_model(tmp_path / "base")
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomise(model)
    model.eval()
    unmerged = logits(model)
    q = model.model.layers[0].self_attn.q_proj
    expected_q = q.merged_weight()
    assert merge_lora(model) is model
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert model.info.lora_config is None
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, expected_q, rtol=0, atol=0)
    assert not any("lora" in n or "base_layer" in n for n in model.state_dict())
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)

    fasttune.save_model(model, tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(hf), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_in_bf16_adds_in_fp32_then_casts(base_dir):
    model = fasttune.load_model(base_dir, dtype=torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("o_proj",)))
    randomise(model, std=0.01)
    o = model.model.layers[1].self_attn.o_proj
    W, A, B = o.base_layer.weight.float(), o.lora_A.weight, o.lora_B.weight
    expected = (W + 2.0 * B @ A).to(torch.bfloat16)
    merge_lora(model)
    merged = model.model.layers[1].self_attn.o_proj.weight
    assert merged.dtype == torch.bfloat16 and not merged.requires_grad
    torch.testing.assert_close(merged, expected.detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# The saved folder


def test_saved_adapter_keys_dtypes_and_config(tmp_path):
    write_checkpoint(tmp_path / "base", "llama")
    model = fasttune.load_model(tmp_path / "base", dtype=torch.bfloat16)
    targets = apply_lora(model, LoraConfig(r=4, alpha=16, dropout=0.1, targets=("up_proj", "q_proj")))
    randomise(model)
    out = save_adapter(model, tmp_path / "adapter", base_model_path="org/base")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no temporary folder left
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    saved = load_file(out / "adapter_model.safetensors")
    assert set(saved) == {f"base_model.model.{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    assert all(t.dtype == torch.float32 for t in saved.values())
    state = lora_state_dict(model)
    for key, t in saved.items():
        torch.testing.assert_close(t, state[key], rtol=0, atol=0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16, 0.1)
    assert config["target_modules"] == ["q_proj", "up_proj"]
    assert config["base_model_name_or_path"] == "org/base"
    assert config["bias"] == "none" and config["modules_to_save"] is None
    assert config["fan_in_fan_out"] is False and config["use_rslora"] is False
    assert config["inference_mode"] is True
    save_adapter(model, out)  # saving over an existing adapter replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"),
        (dict(r=2.5), "r"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=-4), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(targets=()), "targets"),
        (dict(targets="q_proj"), "targets"),
    ],
)
def test_bad_config_values(kwargs, field):
    with pytest.raises(ConfigError, match=f"LoRA {field} must"):
        LoraConfig(**kwargs)


def test_unknown_target_names_it_and_lists_the_linears(base_dir):
    model = fasttune.load_model(base_dir)
    with pytest.raises(
        ConfigError, match=r"'qkv_proj'.*down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj"
    ):
        apply_lora(model, LoraConfig(targets=("q_proj", "qkv_proj")))
    with pytest.raises(ConfigError, match="'lm_head'"):  # the head is never a target
        apply_lora(model, LoraConfig(targets=("lm_head",)))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing changed
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture
def adapter_dir(tmp_path, base_dir):
    model = fasttune.load_model(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomise(model)
    return save_adapter(model, tmp_path / "adapter")


def _edit_config(folder, **changes):
    f = folder / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _edit_weights(folder, edit):
    f = folder / "adapter_model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


KEY = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: _edit_weights(d, lambda t: t.pop(KEY)), f"missing keys: {KEY}"),
        (
            lambda d: _edit_weights(
                d, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": t[KEY].clone()})
            ),
            "unexpected keys: base_model.model.lm_head.lora_A.weight",
        ),
        (
            lambda d: _edit_config(d, r=8),
            r"wrong shape for base_model\.model\.model\.layers\.0\.\S+: \(4, 60\)",
        ),
        (
            lambda d: _edit_config(d, peft_type="PREFIX_TUNING"),
            "adapter_config.json: peft_type is 'PREFIX_TUNING'",
        ),
        (lambda d: _edit_config(d, use_dora=True), "adapter_config.json: unsupported .*use_dora=True"),
        (lambda d: _edit_config(d, use_rslora=True), "adapter_config.json: unsupported .*use_rslora=True"),
        (lambda d: _edit_config(d, bias="all"), "adapter_config.json: unsupported .*bias='all'"),
        (
            lambda d: _edit_config(d, modules_to_save=["lm_head"]),
            "unsupported .*modules_to_save=\\['lm_head'\\]",
        ),
        (lambda d: _edit_config(d, target_modules=".*proj"), "target_modules='.\\*proj'.*not a regex"),
        (lambda d: _edit_config(d, target_modules=["qkv"]), "adapter_config.json: LoRA target.*'qkv'"),
        (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json: file not found"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json: invalid JSON"),
        (
            lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
            "adapter_model.safetensors: file not found .found adapter_model.bin: pickle-based",
        ),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
            "adapter_model.safetensors: truncated",
        ),
    ],
)
def test_bad_adapter_folder(adapter_dir, base_dir, corrupt, message):
    corrupt(adapter_dir)
    model = fasttune.load_model(base_dir)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(model, adapter_dir)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # checked before anything changed


def test_pickled_adapter_is_never_unpickled(tmp_path, base_dir):
    import pickle

    class Boom:
        def __reduce__(self):
            return (math.sqrt, (-1.0,))  # raises ValueError if anything unpickles it

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="adapter_model.bin: pickle-based weights are never loaded"):
        load_adapter(fasttune.load_model(base_dir), folder)


def test_save_without_adapters_is_an_error(tmp_path, base_dir):
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_adapter(fasttune.load_model(base_dir), tmp_path / "adapter")


def test_adapters_follow_the_models_train_or_eval_mode(tmp_path):
    write_checkpoint(tmp_path, "llama")
    model = fasttune.load_model(tmp_path)  # eval mode, as transformers returns models
    apply_lora(model, LoraConfig(r=4, dropout=0.5))
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
