"""`desktune export`: a merged model folder (or a LoRA adapter folder, merged on the way) ->
GGUF files for llama.cpp and an Ollama Modelfile."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model or adapter folder to GGUF (llama.cpp, Ollama)",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", help="merged model folder, or adapter folder (merged with its base first)")
    p.add_argument("output", help="folder to write <name>.<METHOD>.gguf and Modelfile to")
    p.add_argument("-q", "--quantization", action="append", dest="methods", metavar="METHOD",
                   help="f16, bf16, q8_0 (default) or a llama.cpp type (q4_k_m, q5_k_m, q6_k, ...); repeatable")
    p.add_argument("--base", help="base model for an adapter folder (default: the one in adapter_config.json)")
    p.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16",
                   help="dtype the adapter is merged in (default bf16)")
    p.add_argument("--name", help="file name stem of the GGUF files (default: the model's name)")
    p.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile")
    p.add_argument("--threads", type=int, default=0, help="threads for llama.cpp's quantizer (0: all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from desktune.export.gguf import export_folder

    source, output = Path(args.model), Path(args.output)
    methods = args.methods or ["q8_0"]
    output.mkdir(parents=True, exist_ok=True)
    kwargs = dict(file_stem=args.name or source.resolve().name, modelfile=not args.no_modelfile, threads=args.threads)
    if (source / "adapter_config.json").is_file():
        from desktune.cli.merge import load_adapter_model
        from desktune.export.merge import save_merged

        model, tokenizer = load_adapter_model(source, args.base, args.dtype)
        with tempfile.TemporaryDirectory(dir=output, prefix=".merged-") as merged:
            save_merged(model, Path(merged), tokenizer, save_method="merged_16bit")
            del model
            files = export_folder(merged, output, methods, **kwargs)
    else:
        files = export_folder(source, output, methods, **kwargs)
    for f in files:
        print(f"wrote {f}")
    if not args.no_modelfile:
        print(f"wrote {output / 'Modelfile'} (ollama create NAME -f {output / 'Modelfile'})")
    return 0
