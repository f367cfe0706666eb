"""The fused 4-bit LoRA forward agrees with PEFT's own, also under autocast."""

from __future__ import annotations

import torch

from desktune import FastLanguageModel


def _peft_layer(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=0)
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    return layer


def _run(layer, x, fused):
    forward = layer.forward if fused else type(layer).forward.__get__(layer)
    x = x.clone().requires_grad_(True)
    out = forward(x)
    out.float().square().sum().backward()
    grads = (x.grad, layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone())
    layer.zero_grad()
    return out, grads


def test_fused_forward_matches_peft(tiny_model_dir):
    layer = _peft_layer(tiny_model_dir)
    assert "forward" in vars(layer)
    x = torch.randn(3, 5, 64)
    out, grads = _run(layer, x, fused=True)
    ref, ref_grads = _run(layer, x, fused=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_fused_forward_under_autocast_computes_in_the_autocast_dtype(tiny_model_dir):
    layer = _peft_layer(tiny_model_dir)
    x = torch.randn(2, 7, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(layer, x, fused=True)
    assert out.dtype == torch.bfloat16
    ref, ref_grads = _run(layer, x, fused=False)  # float32, no autocast
    # bf16 operands: compare by relative norm error (elementwise bf16 rounding is ~1e-2).
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


def test_gated_mlp_of_4bit_lora_layers_runs_as_one_fused_function(tiny_model_dir):
    import torch.nn.functional as F

    from desktune.lora.fast_lora import fused_gated_mlp

    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=0)
    mlp = model.get_base_model().model.layers[1].mlp
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp, name).lora_B["default"].weight.normal_(0, 0.5)
    x = torch.randn(2, 5, 64)
    assert fused_gated_mlp(mlp, x, "silu") is not None
    assert fused_gated_mlp(mlp, x, "relu") is None  # no fused activation: caller runs the modules

    def peft_forward(layer, h):
        return type(layer).forward(layer, h)  # PEFT's own layer forward, not desktune's

    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = mlp(x1)
    ref = peft_forward(mlp.down_proj, F.silu(peft_forward(mlp.gate_proj, x2)) * peft_forward(mlp.up_proj, x2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), [x1, *[p for p in mlp.parameters() if p.requires_grad]])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x2, *[p for p in mlp.parameters() if p.requires_grad]])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)

    with model.disable_adapter():  # adapters off: the fused MLP steps aside
        assert fused_gated_mlp(mlp, x, "silu") is None


def test_16bit_lora_mlp_is_not_fused(tiny_model_dir):
    from desktune.lora.fast_lora import fused_gated_mlp

    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4)
    assert fused_gated_mlp(model.get_base_model().model.layers[0].mlp, torch.randn(1, 3, 64), "silu") is None


def test_training_again_after_generate_on_the_cpu(tiny_model_dir):
    # bitsandbytes would repack the 4-bit weights of the layers it runs itself (here the ones
    # without LoRA) for its CPU inference kernel during generate, lossily; desktune's loader
    # turns that off per layer, so training after generate sees the same weights.
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"], random_state=0)
    batch = tokenizer(["Add the two numbers: 2 and 3"], return_tensors="pt")
    model.train()
    before = model(**batch, labels=batch.input_ids).loss.item()

    def packed_layers():
        return sum(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m.weight, "quant_state"))

    FastLanguageModel.for_inference(model)
    model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert packed_layers() == 0
    FastLanguageModel.for_training(model)
    after = model(**batch, labels=batch.input_ids)
    after.loss.backward()
    assert abs(after.loss.item() - before) < 1e-5
