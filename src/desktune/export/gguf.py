"""GGUF export for llama.cpp and Ollama.

`convert_hf_to_gguf(folder, out_file, method)` turns a Hugging Face model folder (a merged
16-bit model: config.json, *.safetensors, tokenizer files) into one GGUF file.
`save_pretrained_gguf(model, dir, tokenizer, method)` merges a (PEFT / 4-bit) model into
such a folder first, then converts it and writes an Ollama Modelfile next to it.

Tensors are streamed one at a time (header first, then data), so memory stays around
the largest tensor rather than the whole model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from desktune.errors import GGUFExportError, UnsupportedModelError
from desktune.export import gguf_arch, gguf_quant, gguf_tokenizer
from desktune.log import logger

# Unsloth's save_pretrained_gguf options that have no meaning here (its memory and temporary
# folder tuning); accepted so notebooks written for Unsloth run unchanged.
_UNSLOTH_IGNORED = {"maximum_memory_usage", "temporary_location", "first_conversion", "is_main_process"}

# HF buffers that are not weights.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class _TensorSpec:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    hf_name: str | None  # None: computed, not read (rope_freqs)
    file: Path | None
    part: str | None = None  # gguf_arch.TensorView.part


def convert_hf_to_gguf(folder: str | os.PathLike, out_file: str | os.PathLike, quantization_method: str = "q8_0",
                       *, threads: int = 0) -> Path:
    """Write the HF model in `folder` as a GGUF file at `out_file`; returns its path.

    f32/f16/bf16/q8_0 are written directly; other methods (q4_k_m, q5_k_m, q6_k, ...) are
    first written as 16-bit and then quantized by llama.cpp (see gguf_quant)."""
    folder, out_file = Path(folder), Path(out_file)
    method = gguf_quant.parse_method(quantization_method)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if method.python:
        _write_gguf(folder, out_file, method)
        return out_file
    gguf_quant.require_quantizer(method)  # fail before the slow 16-bit pass
    config = _load_config(folder)
    if "_k" in method.name and int(config.hidden_size) % 256:
        logger.warning("hidden size %d is not a multiple of 256: llama.cpp stores most tensors in a non-k "
                       "fallback type (q5_0/q8_0) instead of %s", config.hidden_size, method.name)
    base = gguf_quant.parse_method("bf16" if str(getattr(config, "dtype", "")).endswith("bfloat16") else "f16")
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".gguf-") as tmp:
        half = Path(tmp) / f"model.{base.file_tag}.gguf"
        _write_gguf(folder, half, base)
        part = out_file.with_name(out_file.name + ".part")
        gguf_quant.quantize_with_llama_cpp(half, part, method, threads=threads)
        os.replace(part, out_file)
    return out_file


def _write_gguf(folder: Path, out_file: Path, method: gguf_quant.QuantMethod) -> None:
    import gguf

    config = _load_config(folder)
    family = gguf_arch.family_for(config)
    arch = gguf.MODEL_ARCH[family.arch]
    specs = _tensor_specs(folder, config, family, arch, method)
    n_vocab = next(s.shape[0] for s in specs if s.gguf_name == "token_embd.weight")

    part = out_file.with_name(out_file.name + ".part")
    writer = gguf.GGUFWriter(part, gguf.MODEL_ARCH_NAMES[arch])
    ok = False
    try:
        writer.add_name(_model_name(folder, config))
        writer.add_file_type(gguf_quant.file_type(method))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gguf_arch.write_hparams(writer, config, family)
        gguf_tokenizer.write_tokenizer(writer, folder, n_vocab)
        for s in specs:
            nbytes = _nbytes(s.shape, s.qtype)
            writer.add_tensor_info(s.gguf_name, s.shape, np.dtype(np.float32), nbytes, raw_dtype=s.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for s in specs:
            data = _load_tensor(s, config, family)
            writer.write_tensor_data(gguf.quants.quantize(data, s.qtype))
        ok = True
    finally:
        writer.close()
        if not ok:
            part.unlink(missing_ok=True)
    os.replace(part, out_file)
    logger.info("wrote %s (%s, %d tensors)", out_file, method.name, len(specs))


def _tensor_specs(folder: Path, config: Any, family: gguf_arch.GGUFFamily, arch: Any,
                  method: gguf_quant.QuantMethod) -> list[_TensorSpec]:
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    specs: list[_TensorSpec] = []
    for file in _safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith(_SKIP_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
                    continue
                shape = tuple(f.get_slice(hf_name).get_shape())
                views = family.views(hf_name, shape) if family.views else [gguf_arch.TensorView(hf_name, None, shape)]
                for view in views:
                    gguf_name = name_map.get_name(view.name, try_suffixes=(".weight", ".bias"))
                    if gguf_name is None:
                        raise UnsupportedModelError(
                            f"{file.name}: tensor {hf_name!r} has no llama.cpp name for {family.model_type}; "
                            "is this a merged model folder (not an adapter, not a 4-bit checkpoint)? "
                            "Save it with save_pretrained_merged(..., save_method='merged_16bit') first."
                        )
                    qtype = gguf_quant.tensor_type(method, view.shape, gguf_name)
                    specs.append(_TensorSpec(gguf_name, view.shape, qtype, hf_name, file, view.part))
    if not any(s.gguf_name == "token_embd.weight" for s in specs):
        raise GGUFExportError(f"{folder} has no token embedding tensor; is it a complete model folder?")
    if gguf_arch.llama3_rope_factors(config) is not None:
        n = gguf_arch.head_dim(config) // 2
        specs.append(_TensorSpec("rope_freqs.weight", (n,), gguf.GGMLQuantizationType.F32, None, None))
    # llama.cpp's usual order: embeddings, blocks in order, output.
    specs.sort(key=lambda s: _order_key(s.gguf_name))
    return specs


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def _order_key(name: str) -> tuple[int, int, str]:
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith(("token_embd", "rope_freqs")) else 2, 0, name)


def _load_tensor(spec: _TensorSpec, config: Any, family: gguf_arch.GGUFFamily) -> np.ndarray:
    from safetensors import safe_open

    if spec.hf_name is None:
        factors = gguf_arch.llama3_rope_factors(config)
        assert factors is not None
        return factors
    with safe_open(spec.file, framework="pt") as f:
        data = f.get_tensor(spec.hf_name).float().numpy()
    data = gguf_arch.cut_view(spec.part, data, spec.gguf_name.endswith(".bias"))
    return np.ascontiguousarray(gguf_arch.transform_tensor(spec.hf_name, data, config, family), dtype=np.float32)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            return [folder / name for name in sorted(set(json.load(f)["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(
            f"{folder} has no *.safetensors weights; GGUF export reads a merged 16-bit model folder "
            "(model.save_pretrained_merged(folder, tokenizer) or `desktune merge` writes one)."
        )
    return files


def _load_config(folder: Path) -> Any:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        hint = " (that is a LoRA adapter folder: run `desktune merge` first)" if (
            folder / "adapter_config.json").is_file() else ""
        raise GGUFExportError(f"{folder} has no config.json{hint}; GGUF export needs a merged model folder.")
    config = AutoConfig.from_pretrained(folder)
    quant = getattr(config, "quantization_config", None)
    if quant:
        kind = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise GGUFExportError(
            f"{folder} holds a quantized checkpoint ({kind}); export a merged 16-bit folder instead "
            "(save_pretrained_merged(..., save_method='merged_16bit') or `desktune merge` dequantizes the base)."
        )
    return config


def _model_name(folder: Path, config: Any) -> str:
    name = getattr(config, "_name_or_path", "") or folder.name
    return Path(str(name)).name or "model"


def save_pretrained_gguf(model: Any, save_directory: str | os.PathLike, tokenizer: Any = None,
                         quantization_method: str | Sequence[str] = "q8_0", *, file_stem: str | None = None,
                         modelfile: bool = True, modelfile_parameters: dict[str, Any] | None = None,
                         threads: int = 0, **unsloth_kwargs: Any) -> list[Path]:
    """Merge `model` (LoRA adapters folded in, a 4-bit base dequantized) into a temporary
    16-bit folder inside `save_directory`, write one GGUF file per quantization method
    there (`<stem>.<METHOD>.gguf`) and an Ollama Modelfile for the first one.

    Returns the GGUF paths. quantization_method: "f16", "bf16", "q8_0" (no compiled tool
    needed) or a llama.cpp type such as "q4_k_m", "q5_k_m", "q6_k" (needs llama-quantize
    or llama-cpp-python); a list writes several."""
    unknown = set(unsloth_kwargs) - _UNSLOTH_IGNORED
    if unknown:
        raise TypeError(f"save_pretrained_gguf() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if unsloth_kwargs:
        logger.info("save_pretrained_gguf: ignoring Unsloth-only options %s", ", ".join(sorted(unsloth_kwargs)))
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise GGUFExportError("quantization_method is empty; pass e.g. 'q8_0' or ['q8_0', 'q4_k_m'].")
    for m in methods:  # reject typos before the slow merge
        gguf_quant.parse_method(m)
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    stem = file_stem or _model_name(save_directory, getattr(model, "config", None))
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".merged-") as merged:
        save_merged_folder(model, Path(merged), tokenizer)
        return export_folder(merged, save_directory, methods, file_stem=stem, modelfile=modelfile,
                             modelfile_parameters=modelfile_parameters, threads=threads)


def export_folder(folder: str | os.PathLike, save_directory: str | os.PathLike,
                  quantization_method: str | Sequence[str] = "q8_0", *, file_stem: str | None = None,
                  modelfile: bool = True, modelfile_parameters: dict[str, Any] | None = None,
                  threads: int = 0) -> list[Path]:
    """GGUF files (`<stem>.<METHOD>.gguf`) and a Modelfile in save_directory from a merged HF folder."""
    folder, save_directory = Path(folder), Path(save_directory)
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    parsed = [gguf_quant.parse_method(m) for m in methods]
    if not parsed:
        raise GGUFExportError("quantization_method is empty; pass e.g. 'q8_0' or ['q8_0', 'q4_k_m'].")
    stem = file_stem or _model_name(folder, _load_config(folder))
    outputs = [convert_hf_to_gguf(folder, save_directory / f"{stem}.{m.file_tag}.gguf", m.name, threads=threads)
               for m in parsed]
    if modelfile:
        from desktune.export.modelfile import write_modelfile

        write_modelfile(save_directory, outputs[0], gguf_chat_template(folder), eos_token=_eos_token(folder),
                        parameters=modelfile_parameters)
    return outputs


def _eos_token(folder: Path) -> str | None:
    import gguf

    eos = gguf.SpecialVocab(folder, load_merges=False).special_token_ids.get("eos")
    tok_json = folder / "tokenizer.json"
    if eos is None or not tok_json.is_file():
        return None
    data = json.loads(tok_json.read_text(encoding="utf-8"))
    for added in data.get("added_tokens", []):
        if added["id"] == eos:
            return added["content"]
    return next((t for t, i in data.get("model", {}).get("vocab", {}).items() if i == eos), None)


def save_merged_folder(model: Any, folder: Path, tokenizer: Any = None) -> None:
    """A plain 16-bit HF folder for `model`: LoRA adapters merged (and a 4-bit base
    dequantized) by desktune's save_merged; a model without adapters is saved as it is."""
    if hasattr(model, "peft_config"):
        from desktune.export.merge import save_merged

        save_merged(model, folder, tokenizer, save_method="merged_16bit")
        return
    if getattr(getattr(model, "config", None), "quantization_config", None):
        raise GGUFExportError(
            "this model has a quantized (4-bit/8-bit) base and no LoRA adapters to merge; load it in 16-bit "
            "(load_in_4bit=False) to export it to GGUF."
        )
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def gguf_chat_template(folder: Path) -> str | None:
    """The chat template the exporter writes into the GGUF file (from the folder's tokenizer files)."""
    import gguf

    template = gguf.SpecialVocab(folder, load_merges=False).chat_template
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
