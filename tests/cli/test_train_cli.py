"""`desktune train`: config names, overrides, errors (the training itself: tests/train)."""

from __future__ import annotations

import logging

import yaml

from desktune.cli.main import main


def test_list_configs_names_the_packaged_examples(capsys):
    assert main(["train", "--list-configs"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-8b-qlora" in out and "gpt-oss-20b-qlora" in out


def test_print_config_resolves_example_name_and_overrides(capsys):
    assert main(["train", "gpt-oss-20b-qlora", "training.max_steps=3", "lora.r=4", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["name"] == "unsloth/gpt-oss-20b"
    assert config["template"]["name"] == "gpt-oss"
    assert config["training"]["max_steps"] == 3 and config["lora"]["r"] == 4


def test_overrides_alone_use_the_defaults(capsys):
    assert main(["train", "data.path=rows.jsonl", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["path"] == "rows.jsonl"


def test_unknown_key_fails_with_its_name(caplog, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {path: x.jsonl}\ntraining: {max_stesp: 3}\n")
    with caplog.at_level(logging.ERROR, logger="desktune"):
        assert main(["train", str(path)]) == 1
    assert "unknown config key 'training.max_stesp'; did you mean 'max_steps'?" in caplog.text


def test_missing_config_file(caplog, tmp_path):
    with caplog.at_level(logging.ERROR, logger="desktune"):
        assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "no such config file" in caplog.text


def test_ctrl_c_names_the_checkpoint_to_resume_from(monkeypatch, caplog, tmp_path):
    import desktune.train.runner as runner

    def interrupted(config, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    (tmp_path / "run" / "checkpoint-40").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-20").mkdir()
    with caplog.at_level(logging.ERROR, logger="desktune"):
        assert main(["train", "data.path=x.jsonl", f"output.dir={tmp_path / 'run'}"]) == 130
    assert "checkpoint-40" in caplog.text and "--resume" in caplog.text
