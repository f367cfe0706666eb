"""Loading gpt-oss checkpoints tensor by tensor, quantising on the way.

The model is built on the meta device, its experts replaced by GroupedExperts, and (for
4-bit) its attention projections by bitsandbytes Linear4bit. Then each checkpoint tensor
is read from safetensors on the CPU, converted, and placed: expert stacks are quantised
to NF4 one expert at a time, attention weights go through bitsandbytes' NF4 quantiser.
No 16-bit copy of the whole model ever exists on the GPU (or in host RAM): the peak is
one checkpoint tensor plus one expert.

Checkpoints: BF16 (`mlp.experts.gate_up_proj` [E, H, 2I], as transformers saves it) or
OpenAI's MXFP4 (`..._blocks` [E, out, in/32, 16] uint8 two FP4 E2M1 values per byte,
low nibble first, and `..._scales` [E, out, in/32] uint8 power-of-two exponents biased by
127), dequantised expert by expert.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from desktune.errors import DesktuneError, ModelPathError
from desktune.log import logger
from desktune.models.gpt_oss_moe import GroupedExperts

FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# transformers keeps these norms in float32 (GptOssPreTrainedModel._keep_in_fp32_modules)
_FP32_PARTS = ("input_layernorm", "post_attention_layernorm", "model.norm")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert: blocks [out, in/32, 16] uint8, scales [out, in/32] uint8 -> [in, out] weight."""
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    blocks = blocks.to(torch.uint8)
    values = torch.stack((lut[(blocks & 15).long()], lut[(blocks >> 4).long()]), dim=-1)  # low nibble first
    values = values.reshape(*scales.shape, 32)
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.reshape(scales.shape[0], -1).t().to(dtype)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelPathError(f"{str(folder)!r} holds no model.safetensors or model.safetensors.index.json")


def local_folder(resolved: str, token: str | None) -> Path:
    path = Path(resolved)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(resolved, token=token, allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                            "*.txt", "*.model"]))


def _to_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta",
    )


def build_skeleton(config, dtype: torch.dtype, load_in_4bit: bool, device: torch.device,
                   quantize_attention: bool | None = None):
    """GptOssForCausalLM on meta, with GroupedExperts (allocated on `device`) and Linear4bit attention.

    quantize_attention defaults to load_in_4bit; False keeps the attention projections 16-bit
    (for machines without bitsandbytes: the experts' NF4 needs only desktune's kernels).
    """
    quantize_attention = load_in_4bit if quantize_attention is None else quantize_attention
    from transformers import GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # MXFP4 is dequantised here, not by transformers' quantizer
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    model.to(dtype)
    for layer in model.model.layers:
        layer.mlp.experts = GroupedExperts(config, load_in_4bit, dtype, device)
        if quantize_attention:
            for name in ATTENTION_PROJECTIONS:
                setattr(layer.self_attn, name, _to_linear4bit(getattr(layer.self_attn, name), dtype))
    with torch.device(device):
        model.model.rotary_emb = GptOssRotaryEmbedding(config)  # its buffers are computed, not loaded
    return model


def _place(model: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    import_name, _, attr = name.rpartition(".")
    module = model.get_submodule(import_name)
    if type(module).__name__ == "Linear4bit" and attr == "weight":
        import bitsandbytes as bnb

        param = bnb.nn.Params4bit(value.to(dtype), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.uint8, module=module)
        module.weight = param.to(device)  # bitsandbytes quantises on the move
        return
    target_dtype = torch.float32 if any(part in name for part in _FP32_PARTS) else dtype
    current = getattr(module, attr)
    if tuple(current.shape) != tuple(value.shape):
        raise ModelPathError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, the config gives "
                             f"{tuple(current.shape)}: the config.json does not match the weights")
    setattr(module, attr, nn.Parameter(value.to(device, target_dtype), requires_grad=False))


def _load_experts(experts: GroupedExperts, stack: str, tensors: dict, dtype, device) -> None:
    if stack in tensors:
        experts.load_weight_(stack, tensors[stack].to(device))
        return
    blocks, scales = tensors[f"{stack}_blocks"], tensors[f"{stack}_scales"]
    for e in range(experts.num_experts):
        experts.load_expert_(stack, e, dequantize_mxfp4(blocks[e].to(device), scales[e].to(device), dtype))


def load_weights(model: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
    from safetensors import safe_open

    pending: dict[str, dict[str, torch.Tensor]] = {}  # experts module -> its MXFP4 parts seen so far
    loaded = set()
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                module_name, _, attr = key.rpartition(".")
                if module_name.endswith("mlp.experts"):
                    experts = model.get_submodule(module_name)
                    stack = attr.removesuffix("_blocks").removesuffix("_scales")
                    if attr.endswith("_bias"):
                        experts.load_weight_(attr, f.get_tensor(key).to(device, dtype))
                        loaded.add(key)
                        continue
                    parts = pending.setdefault(f"{module_name}.{stack}", {})
                    parts[attr] = f.get_tensor(key)
                    if stack in parts or (f"{stack}_blocks" in parts and f"{stack}_scales" in parts):
                        _load_experts(experts, stack, parts, dtype, device)
                        del pending[f"{module_name}.{stack}"]
                        loaded.add(f"{module_name}.{stack}")
                    continue
                _place(model, key, f.get_tensor(key), dtype, device)
                loaded.add(key)
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    if pending:
        raise ModelPathError(f"the checkpoint has incomplete MXFP4 expert weights: {sorted(pending)}")
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise ModelPathError(f"the checkpoint in {str(folder)!r} lacks {len(missing)} tensors the config needs, e.g. "
                             f"{missing[:5]}: the folder is incomplete or belongs to another model")


@torch.no_grad()
def random_gpt_oss(config, dtype: torch.dtype, load_in_4bit: bool, device, seed: int = 0,
                   quantize_attention: bool | None = None):
    """A random-weight gpt-oss of `config`'s shape, built tensor by tensor like a checkpoint load.

    For benchmarks and GPU tests of the real sizes with nothing downloaded: each tensor is drawn
    on `device` (normal, std = initializer_range; sinks and biases small) and quantised at once.
    """
    device = torch.device(device)
    model = build_skeleton(config, dtype, load_in_4bit, device, quantize_attention)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range

    def draw(shape, scale=std):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    for module_name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            for stack in ("gate_up_proj", "down_proj"):
                for e in range(module.num_experts):
                    module.load_expert_(stack, e, draw(getattr(module, stack).shape[1:]))
            for bias in ("gate_up_proj_bias", "down_proj_bias"):
                module.load_weight_(bias, draw(getattr(module, bias).shape, 0.01))
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            full = f"{module_name}.{name}"
            if "norm" in full:
                value = torch.ones(param.shape, device=device)
            elif name == "sinks" or name == "bias":
                value = draw(param.shape, 0.01 if name == "bias" else 1.0)
            else:
                value = draw(param.shape)
            _place(model, full, value, dtype, device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model._desktune_load_in_4bit = load_in_4bit
    return model


def load_gpt_oss(resolved: str, config, dtype: torch.dtype, load_in_4bit: bool, load_in_8bit: bool, device_map,
                 token: str | None = None):
    """The GptOssForCausalLM of a local or cached checkpoint, experts grouped (and NF4 when 4-bit)."""
    if load_in_8bit:
        raise DesktuneError("gpt-oss has no 8-bit path in desktune: load it with load_in_4bit=True (NF4) or in "
                            "16-bit (load_in_4bit=False)")
    if load_in_4bit:
        from desktune.quant.bnb import require_bitsandbytes

        require_bitsandbytes("load_in_4bit=True")
    device = _device(device_map)
    folder = local_folder(resolved, token)
    model = build_skeleton(config, dtype, load_in_4bit, device)
    load_weights(model, folder, dtype, device)
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.eval()
    model._desktune_load_in_4bit = load_in_4bit
    logger.info("loaded gpt-oss from %s: experts %s, attention %s", folder, "NF4" if load_in_4bit else dtype,
                "NF4" if load_in_4bit else dtype)
    return model


def _device(device_map) -> torch.device:
    if device_map is None:
        return torch.device(torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, (str, int, torch.device)) and str(device_map) not in ("auto", "balanced", "sequential"):
        return torch.device(device_map) if not isinstance(device_map, int) else torch.device("cuda", device_map)
    raise DesktuneError(f"gpt-oss loads onto one device; device_map={device_map!r} splits it. Pass device_map=None "
                        f"(the current GPU), 'cpu', or {{'': gpu_index}}")
