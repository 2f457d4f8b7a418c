"""The `fasttune` command: `info` on the environment and on a model folder, and its error exit."""

import pytest

from fasttune.cli.main import main
from fasttune.models.tokenizer import write_builtin_tokenizer
from helpers import write_checkpoint


def test_info_reports_the_environment(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "attention on cpu/float32: SDPA per sequence" in out


def test_info_checks_a_model_folder_and_shows_the_trained_tokens(tmp_path, capsys):
    write_checkpoint(tmp_path, "qwen2_tied")
    write_builtin_tokenizer(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "qwen2, 0.1M parameters, stored as F32 in 1 file(s)" in out
    assert "heads 6 q / 2 kv x hd 10, tied head" in out
    assert "[[A patient heart sees colors in the dark that hurried eyes miss.<|im_end|>]]" in out
    assert "warning: the tokenizer has 151665 tokens but the model's vocabulary is 131" in out


def test_info_on_a_bad_folder_exits_2_with_the_reason(tmp_path, capsys):
    write_checkpoint(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    assert main(["info", str(tmp_path)]) == 2
    assert "no model.safetensors or model.safetensors.index.json" in capsys.readouterr().err


def test_run_overrides_may_follow_options(tmp_path, capsys):
    """`fasttune run cfg.yaml --nproc 4 lr=1e-4`: argparse alone would reject the override after an option."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("max_steps: 3\n")
    assert main(["run", str(cfg), "--print-config", "max_steps=7", "~eval_every"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "eval_every: 100" in out
    with pytest.raises(SystemExit):
        main(["run", str(cfg), "--print-config", "--no-such-flag"])
    with pytest.raises(SystemExit):
        main(["info", "--no-such-flag"])
