"""The one typed config of a training run, read from YAML with dotted key=value overrides.

    model:         which checkpoint, sequence length, dtype
    quantization:  4-bit / 8-bit base weights, or full fine-tuning
    lora:          adapter shape
    data:          where the rows are and what to do with malformed ones
    template:      chat template and response-only loss
    training:      optimiser, schedule, batch, checkpoints
    output:        the run folder (checkpoints, TensorBoard logs, adapter)

Every key of a YAML file or override must be a field below: an unknown key is an
error that names it (and the closest known key), so a typo never silently trains
with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desktune.errors import TrainConfigError


@dataclass
class ModelSection:
    name: str = "unsloth/Llama-3.1-8B-Instruct"  # a local folder or a hub id in the HF cache
    max_seq_length: int = 2048
    dtype: str | None = None  # "bfloat16" | "float16" | "float32"; None: the best the GPU has


@dataclass
class QuantizationSection:
    load_in_4bit: bool = True  # NF4 base weights (QLoRA)
    load_in_8bit: bool = False
    full_finetuning: bool = False  # train every weight in 16-bit; no LoRA, no quantisation


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: every attention and MLP projection
    use_rslora: bool = False
    gradient_checkpointing: str | bool = "unsloth"
    random_state: int = 3407


@dataclass
class DataSection:
    path: str = ""  # JSONL/CSV/Parquet file or folder, or a HF dataset id
    format: str = "auto"  # auto | alpaca | sharegpt | messages | text
    split: str = "train"
    system_prompt: str | None = None
    on_bad_row: str = "stop"  # stop | skip
    max_rows: int | None = None
    packing: bool = False


@dataclass
class TemplateSection:
    name: str | None = "llama-3.1"  # None: keep the tokenizer's own chat template
    train_on_responses_only: bool = True
    instruction_part: str | None = None  # None: the template's own markers
    response_part: str | None = None


@dataclass
class TrainingSection:
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    max_steps: int = 60  # -1: train num_train_epochs epochs
    num_train_epochs: float = 1.0
    warmup_steps: int = 5
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_8bit"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 3407
    logging_steps: int = 1
    save_steps: int = 20  # a killed run loses at most this many steps
    save_total_limit: int | None = 3


@dataclass
class OutputSection:
    dir: str = "outputs/run"
    tensorboard: bool = True
    save_adapter: bool = True  # the final adapter (or model) goes to <dir>/final


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    template: TemplateSection = field(default_factory=TemplateSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output: OutputSection = field(default_factory=OutputSection)

    def validate(self) -> "TrainConfig":
        if not self.data.path:
            raise TrainConfigError("data.path is empty: set it to a data file, folder or HF dataset id")
        if self.data.on_bad_row not in ("stop", "skip"):
            raise TrainConfigError(f"data.on_bad_row must be 'stop' or 'skip', got {self.data.on_bad_row!r}")
        for name in ("max_seq_length",):
            if getattr(self.model, name) <= 0:
                raise TrainConfigError(f"model.{name} must be positive")
        t = self.training
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            if getattr(t, name) <= 0:
                raise TrainConfigError(f"training.{name} must be positive, got {getattr(t, name)}")
        if t.max_steps == 0 or t.max_steps < -1:
            raise TrainConfigError(f"training.max_steps must be positive or -1 (use epochs), got {t.max_steps}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unknown(key: str, known: list[str]) -> TrainConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return TrainConfigError(f"unknown config key {key!r}{hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the field's declared type; strings from the command line are parsed."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in options:
                return None
        options = [o for o in options if o is not type(None)]
        if not isinstance(value, str) and any(type(value) is o for o in options):
            return value
        for option in sorted(options, key=lambda o: o is str):  # a string is the last resort
            try:
                return _coerce(value, option, key)
            except TrainConfigError:
                pass
        raise TrainConfigError(f"{key}: {value!r} is not a {' or '.join(getattr(o, '__name__', str(o)) for o in options)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key} should be a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise TrainConfigError(f"{key} should be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise TrainConfigError(f"{key} should be a number, got {value!r}")
        try:
            number = hint(value) if not (hint is int and isinstance(value, float)) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (hint is int and isinstance(value, str) and str(number) != value.strip()):
            raise TrainConfigError(f"{key} should be {'an integer' if hint is int else 'a number'}, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise TrainConfigError(f"{key} should be a string, got {value!r}")
        return str(value)
    raise TrainConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover


def _set_section(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    known = [f.name for f in dataclasses.fields(section)]
    for key, value in values.items():
        if key not in known:
            raise _unknown(f"{prefix}.{key}", known)
        setattr(section, key, _coerce(value, hints[key], f"{prefix}.{key}"))


def config_from_dict(raw: dict[str, Any] | None) -> TrainConfig:
    config = TrainConfig()
    sections = [f.name for f in dataclasses.fields(config)]
    for name, values in (raw or {}).items():
        if name not in sections:
            raise _unknown(name, sections)
        if not isinstance(values, dict):
            raise TrainConfigError(f"config section {name!r} should be a mapping of keys, got {values!r}")
        _set_section(getattr(config, name), values, name)
    return config


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings (the command line's) to `config`."""
    sections = [f.name for f in dataclasses.fields(config)]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise TrainConfigError(f"override {item!r} should look like section.key=value (e.g. training.max_steps=100)")
        name, _, leaf = key.strip().partition(".")
        if name not in sections:
            raise _unknown(key, sections)
        _set_section(getattr(config, name), {leaf: value.strip()}, name)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A validated TrainConfig from a YAML file (or the defaults) plus overrides."""
    import yaml

    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"{path}: no such config file (examples: `desktune train --list-configs`)")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{path}: a config file should be a mapping of sections")
    return apply_overrides(config_from_dict(raw), list(overrides)).validate()


def dump_config(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def packaged_configs() -> dict[str, Path]:
    """Example configs shipped in desktune/configs: name -> path."""
    from importlib import resources

    folder = resources.files("desktune") / "configs"
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}
