"""Loading gpt-oss: NF4 experts and attention without 16-bit copies, MXFP4 checkpoints, bad input."""

import pytest
import torch

from desktune import FastLanguageModel
from desktune.errors import DesktuneError
from desktune.models.gpt_oss_moe import GroupedExperts


def _state(folder):
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


def test_4bit_load_keeps_experts_and_attention_in_nf4(gpt_oss_dir):
    model, _ = FastLanguageModel.from_pretrained(gpt_oss_dir, max_seq_length=64, load_in_4bit=True)
    original = _state(gpt_oss_dir)
    for i, layer in enumerate(model.model.layers):
        assert type(layer.self_attn.q_proj).__name__ == "Linear4bit"
        assert layer.self_attn.q_proj.weight.dtype == torch.uint8
        experts = layer.mlp.experts
        assert isinstance(experts, GroupedExperts) and experts.quantized
        for stack in ("gate_up_proj", "down_proj"):
            placeholder = getattr(experts, stack)
            assert placeholder.untyped_storage().nbytes() <= placeholder.element_size()  # no 16-bit copy
            nf4 = getattr(experts, f"{stack}_nf4")
            assert nf4.packed.dtype == torch.uint8 and nf4.packed.numel() * 2 == placeholder.numel()
            dense = original[f"model.layers.{i}.mlp.experts.{stack}"]
            error = (nf4.dequantize(0, experts.num_experts).float() - dense).norm() / dense.norm()
            assert error < 0.12  # NF4's usual ~9 % relative error, not a wrong layout
        assert experts.gate_up_proj_bias.dtype == torch.float32
    # the router stays in 16/32-bit
    assert model.model.layers[0].mlp.router.weight.dtype == torch.float32


def test_4bit_logits_stay_close_to_16bit(gpt_oss_dir):
    full, _ = FastLanguageModel.from_pretrained(gpt_oss_dir, max_seq_length=64, load_in_4bit=False)
    nf4, _ = FastLanguageModel.from_pretrained(gpt_oss_dir, max_seq_length=64, load_in_4bit=True)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(input_ids=ids).logits.flatten(), nf4(input_ids=ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, 0) > 0.85
    assert not torch.equal(a, b)


def test_mxfp4_checkpoint_is_dequantised_like_transformers_does(gpt_oss_mxfp4_dir, gpt_oss_dir):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model, _ = FastLanguageModel.from_pretrained(gpt_oss_mxfp4_dir, max_seq_length=64, load_in_4bit=False)
    packed = _state(gpt_oss_mxfp4_dir)
    original = _state(gpt_oss_dir)
    for stack in ("gate_up_proj", "down_proj"):
        name = f"model.layers.1.mlp.experts.{stack}"
        theirs = convert_moe_packed_tensors(packed[f"{name}_blocks"], packed[f"{name}_scales"], dtype=torch.float32)
        ours = getattr(model.model.layers[1].mlp.experts, stack)
        torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=0)
        error = (ours.detach() - original[name]).norm() / original[name].norm()
        assert error < 0.2  # FP4 of the fixture's weights, in the right orientation


def test_mxfp4_checkpoint_loads_in_4bit(gpt_oss_mxfp4_dir):
    model, _ = FastLanguageModel.from_pretrained(gpt_oss_mxfp4_dir, max_seq_length=64, load_in_4bit=True)
    model.train()
    ids = torch.randint(3, 100, (1, 9))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_8bit_is_refused_with_advice(gpt_oss_dir):
    with pytest.raises(DesktuneError, match="load_in_4bit=True"):
        FastLanguageModel.from_pretrained(gpt_oss_dir, load_in_4bit=False, load_in_8bit=True)


def test_incomplete_checkpoint_names_the_missing_tensors(gpt_oss_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from desktune.errors import ModelPathError

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source := __import__("pathlib").Path(gpt_oss_dir) / name).exists():
            shutil.copy(source, tmp_path / name)
    state = {k: v for k, v in _state(gpt_oss_dir).items() if "layers.1.self_attn.sinks" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelPathError, match="sinks"):
        FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False)
