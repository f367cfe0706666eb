"""`desktune merge`: a LoRA adapter folder + its base model -> one merged 16-bit model folder
that plain transformers (and `desktune export`) loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from desktune.errors import ModelPathError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model (16-bit folder)",
                              description=__doc__.splitlines()[0])
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter weights)")
    p.add_argument("output", help="folder to write the merged model and tokenizer to")
    p.add_argument("--base", help="base model folder or hub id (default: the one named in adapter_config.json)")
    p.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16",
                   help="dtype of the merged weights (default bf16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from desktune.export.merge import save_merged

    model, tokenizer = load_adapter_model(Path(args.adapter), args.base, args.dtype)
    out = save_merged(model, Path(args.output), tokenizer, save_method="merged_16bit")
    print(f"merged model written to {out}")
    return 0


def load_adapter_model(adapter: Path, base: str | None, dtype: str):
    """The base model (16-bit, on the GPU when there is one) with the adapter loaded on top,
    and the tokenizer (the adapter folder's own when it has one, else the base's)."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (adapter / "adapter_config.json").is_file():
        raise ModelPathError(f"{adapter} has no adapter_config.json; pass the folder model.save_pretrained() wrote.")
    config = PeftConfig.from_pretrained(str(adapter))
    base = base or config.base_model_name_or_path
    if not base:
        raise ModelPathError(f"{adapter}/adapter_config.json names no base model; pass --base FOLDER_OR_ID.")
    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    device_map = "auto" if torch.cuda.is_available() else None
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, device_map=device_map)
    except OSError as exc:
        raise ModelPathError(f"cannot load base model {base!r} ({exc}); pass --base with a local folder.") from exc
    model = PeftModel.from_pretrained(model, str(adapter))
    has_tokenizer = (adapter / "tokenizer_config.json").is_file() or (adapter / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter) if has_tokenizer else base)
    return model, tokenizer
