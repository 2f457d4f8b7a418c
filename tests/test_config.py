"""The run config: the issue's overrides exactly as written, YAML files, ~key resets, and one clear error
for each kind of mistake."""

import pytest

from fasttune.errors import ConfigError
from fasttune.train.config import BUILTIN_PRESET, RunConfig, load_config


def test_the_documented_overrides_work_exactly_as_written():
    cfg = load_config(
        None,
        "max_steps=20 save_every=10 eval_every=10 output_dir=out method=lora seed=0 kernels=torch".split(),
    )
    assert (cfg.max_steps, cfg.save_every, cfg.eval_every, cfg.output_dir) == (20, 10, 10, "out")
    assert (cfg.method, cfg.seed, cfg.kernels) == ("lora", 0, "torch")


def test_defaults_follow_the_reference_recipe():
    cfg = RunConfig()
    assert cfg.optim.lr == 2e-5 and cfg.optim.schedule == "cosine" and cfg.optim.warmup == 0.05
    assert cfg.optim.weight_decay == 0.01 and cfg.epochs == 3 and cfg.precision == "bf16"
    assert cfg.optim.grad_clip == 1.0 and cfg.eval_every == 100 and cfg.save_every == 500


def test_yaml_sections_leaf_names_and_resets(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text(
        "method: lora\nepochs: 1\noptim:\n  lr: 1e-4\n  betas: [0.9, 0.95]\nlora:\n  r: 8\n"
        "  targets: [q_proj, v_proj]\ndata:\n  system_prompt: none\n"
    )
    cfg = load_config(f, ["weight_decay=0", "optim.warmup=0.1", "~epochs", "targets=[o_proj]"])
    assert cfg.method == "lora" and cfg.optim.lr == 1e-4 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.lora.r == 8 and cfg.lora.targets == ["o_proj"] and cfg.data.system_prompt == "none"
    assert cfg.optim.weight_decay == 0.0 and cfg.optim.warmup == 0.1 and cfg.epochs == 3.0  # ~ resets
    assert load_config(None, ["~max_steps"]).max_steps is None
    for key, value in BUILTIN_PRESET.items():  # no file: the built-in preset
        *sections, leaf = key.split(".")
        obj = load_config(None)
        for s in sections:
            obj = getattr(obj, s)
        assert getattr(obj, leaf) == value


@pytest.mark.parametrize(
    "args, message",
    [
        (["evl_every=5"], "override 'evl_every=5': unknown key 'evl_every'; did you mean 'eval_every'?"),
        (["max_steps=many"], "max_steps must be int, got 'many'"),
        (["lr=yes"], "optim.lr must be float, got True"),
        (["betas=0.9"], "optim.betas must be a list"),
        (["method=dpo"], "method must be one of full, lora, qlora, got 'dpo'"),
        (["precision=fp8"], "precision must be one of"),
        (["data.files=[missing.jsonl]"], "data.files: missing.jsonl not found"),
        (["warmup=1.5"], "optim.warmup is a fraction"),
        (["keep_checkpoints=1"], "keep_checkpoints must be at least 2"),
        (["max_seq_len=9000"], "data.max_seq_len \\(9000\\) must fit in micro_batch_tokens"),
        (["lr"], "expected key=value or ~key"),
        (["~nothing"], "unknown key 'nothing'"),
    ],
)
def test_config_errors_are_clear(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML at line"):
        load_config(bad)
    bad.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'optim.learning_rate'"):
        load_config(bad)
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match="model: .*model has no config.json"):
        load_config(None, [f"model={tmp_path / 'model'}"])


@pytest.mark.parametrize("name", ["qwen2.5-0.5b-full.yaml", "qwen2.5-0.5b-lora.yaml"])
def test_shipped_configs_resolve(tmp_path, name):
    from pathlib import Path

    (tmp_path / "config.json").write_text("{}")
    path = Path(__file__).parent.parent / "configs" / name
    cfg = load_config(path, [f"model={tmp_path}"])
    assert cfg.model == str(tmp_path) and cfg.micro_batch_tokens == 2048 and cfg.precision == "bf16"
    assert cfg.method == ("lora" if "lora" in name else "full")
    with pytest.raises(ConfigError, match="models/Qwen2.5-0.5B-Instruct is not a folder"):
        load_config(path)  # as shipped it names the folder to download the model into
