"""The typed training config: YAML mapping, overrides, unknown keys, packaged examples."""

from __future__ import annotations

import pytest

from desktune.errors import TrainConfigError
from desktune.train.config import TrainConfig, apply_overrides, config_from_dict, load_config, packaged_configs


def test_yaml_sections_map_onto_typed_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {name: /models/x, max_seq_length: 512}\n"
        "lora: {r: 8, target_modules: [q_proj, v_proj], gradient_checkpointing: false}\n"
        "data: {path: d.jsonl, max_rows: 10}\n"
        "training: {learning_rate: 1.0e-4, save_total_limit: null}\n"
    )
    config = load_config(path)
    assert config.model.name == "/models/x" and config.model.max_seq_length == 512
    assert config.lora.r == 8 and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.lora.gradient_checkpointing is False
    assert config.training.learning_rate == 1e-4 and config.training.save_total_limit is None
    assert config.training.max_steps == TrainConfig().training.max_steps  # untouched keys keep defaults


def test_overrides_parse_to_the_field_type():
    config = apply_overrides(
        TrainConfig(),
        [
            "training.learning_rate=1e-4",  # YAML would read this as a string
            "training.max_steps=7",
            "quantization.load_in_4bit=false",
            "lora.target_modules=q_proj,k_proj",
            "lora.gradient_checkpointing=unsloth",
            "template.name=none",
            "data.path=a=b.jsonl",  # only the first '=' splits
        ],
    )
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.training.max_steps == 7 and isinstance(config.training.max_steps, int)
    assert config.quantization.load_in_4bit is False
    assert config.lora.target_modules == ["q_proj", "k_proj"]
    assert config.lora.gradient_checkpointing == "unsloth"
    assert config.template.name is None
    assert config.data.path == "a=b.jsonl"


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"trainer": {}}, r"unknown config key 'trainer'; did you mean 'training'"),
        ({"training": {"learning_rat": 1}}, r"'training.learning_rat'; did you mean 'learning_rate'"),
        ({"training": {"max_steps": "ten"}}, r"training.max_steps should be an integer, got 'ten'"),
        ({"training": {"max_steps": 2.5}}, r"training.max_steps should be an integer"),
        ({"quantization": {"load_in_4bit": "maybe"}}, r"load_in_4bit should be true or false"),
        ({"lora": 3}, r"section 'lora' should be a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_key(raw, match):
    with pytest.raises(TrainConfigError, match=match):
        config_from_dict(raw)


def test_bad_override_and_validation_errors():
    with pytest.raises(TrainConfigError, match="section.key=value"):
        apply_overrides(TrainConfig(), ["max_steps=3"])
    with pytest.raises(TrainConfigError, match=r"'model.nme'; did you mean 'name'"):
        apply_overrides(TrainConfig(), ["model.nme=x"])
    with pytest.raises(TrainConfigError, match="data.path is empty"):
        load_config(None, [])
    with pytest.raises(TrainConfigError, match="on_bad_row"):
        load_config(None, ["data.path=x", "data.on_bad_row=ignore"])


@pytest.mark.parametrize("name", sorted(packaged_configs()))
def test_packaged_examples_load(name):
    config = load_config(packaged_configs()[name])
    assert config.data.path and config.model.name and config.output.dir


def test_examples_are_shipped():
    assert {"llama-3.1-8b-qlora", "gpt-oss-20b-qlora"} <= set(packaged_configs())
