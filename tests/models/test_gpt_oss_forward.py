"""gpt-oss fast path vs transformers' own GptOssForCausalLM (+ PEFT) on a tiny random model."""

import pytest
import torch

from desktune import FastLanguageModel
from desktune.models.gpt_oss_attention import sink_attention_flex, sink_attention_reference
from desktune.models.gpt_oss_moe import GroupedExperts

SEQ = 11  # longer than the tiny model's sliding window (4)


def _reference(folder):
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.train()  # dropout is 0: train mode only switches desktune's attention path on


def _ours(folder):
    model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=False)
    return model.train()


def _ids(seed=0, batch=2):
    return torch.randint(3, 100, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def test_model_is_patched_with_grouped_experts_and_sink_attention(gpt_oss_dir):
    model = _ours(gpt_oss_dir)
    assert model._desktune_patches["grouped_experts"] == 2
    assert model._desktune_patches["sink_attention"] == 2
    assert all(isinstance(layer.mlp.experts, GroupedExperts) for layer in model.model.layers)


def test_logits_and_loss_match_transformers(gpt_oss_dir):
    ref, ours = _reference(gpt_oss_dir), _ours(gpt_oss_dir)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss)


def _route_edge_case(model, case):
    with torch.no_grad():
        for layer in model.model.layers:
            router = layer.mlp.router
            if case == "empty_expert":
                router.bias[3] = -1e4  # expert 3 never in anyone's top-2
            else:  # every logit equal: top-k breaks the ties
                router.weight.zero_()
                router.bias.fill_(0.25)


@pytest.mark.parametrize("case", ["empty_expert", "ties"])
def test_routing_edge_cases_match_transformers(gpt_oss_dir, case):
    ref, ours = _reference(gpt_oss_dir), _ours(gpt_oss_dir)
    _route_edge_case(ref, case)
    _route_edge_case(ours, case)
    ids = _ids(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_right_padding_drops_the_mask_and_left_padding_keeps_transformers_path(gpt_oss_dir):
    ref, ours = _reference(gpt_oss_dir), _ours(gpt_oss_dir)
    ids = _ids(2)
    right = torch.ones_like(ids)
    right[1, 7:] = 0
    labels = ids.masked_fill(right == 0, -100)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=right, labels=labels).loss,
                                   ref(input_ids=ids, attention_mask=right, labels=labels).loss)
        left = right.flip(1)
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=left).logits,
                                   ref(input_ids=ids, attention_mask=left).logits, rtol=1e-4, atol=1e-4)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _lora_params(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def test_lora_gradients_match_transformers_and_peft(gpt_oss_dir):
    from peft import LoraConfig, get_peft_model

    ref = get_peft_model(_reference(gpt_oss_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                             target_parameters=EXPERT_PARAMS))
    ours = FastLanguageModel.get_peft_model(_ours(gpt_oss_dir), r=4, lora_alpha=8,
                                            use_gradient_checkpointing=False)
    ours.train()
    ref_params, our_params = _lora_params(ref), _lora_params(ours)
    assert set(ref_params) == set(our_params)
    assert any("experts" in name for name in our_params)
    torch.manual_seed(5)
    with torch.no_grad():  # B starts at zero, which would hide every gradient of A
        for name, param in our_params.items():
            param.normal_(0.0, 0.2)
            ref_params[name].copy_(param)
    ids = _ids(3)
    ref_loss = ref(input_ids=ids, labels=ids).loss
    our_loss = ours(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(our_loss, ref_loss, rtol=1e-5, atol=1e-5)
    ref_loss.backward()
    our_loss.backward()
    for name, param in our_params.items():
        assert param.grad is not None and param.grad.abs().max() > 0, name
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_unsloth_style_targets_map_to_expert_parameters(gpt_oss_dir):
    ours = FastLanguageModel.get_peft_model(
        _ours(gpt_oss_dir), r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    config = ours.peft_config["default"]
    assert sorted(config.target_parameters) == sorted(EXPERT_PARAMS)
    assert set(config.target_modules) == set(TARGETS)


@pytest.mark.parametrize("window", [None, 4])
def test_flex_sink_formula_matches_dense_reference(window):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, 16)
    k, v = torch.randn(2, 2, 37, 16), torch.randn(2, 2, 37, 16)
    sinks = torch.randn(4)
    with torch.no_grad():  # FlexAttention has no CPU backward; its forward checks the sink/LSE math
        flex = sink_attention_flex(q, k, v, sinks, 0.25, window, compiled=False)
    torch.testing.assert_close(flex, sink_attention_reference(q, k, v, sinks, 0.25, window), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_flex_sink_attention_grads_match_reference_on_cuda(window):
    torch.manual_seed(0)
    shape_q, shape_kv = (1, 8, 1000, 64), (1, 2, 1000, 64)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = sink_attention_flex(q, k, v, sinks, 0.125, window)
    leaves = (q, k, v, sinks)
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = sink_attention_reference(*ref_leaves, 0.125, window)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    for got, want in zip(grads, ref_grads):
        assert torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), 0) > 0.99


def test_packed_rows_are_left_to_transformers_masks(gpt_oss_dir):
    ref, ours = _reference(gpt_oss_dir), _ours(gpt_oss_dir)
    ids = _ids(4, batch=1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])  # two documents in one row
    calls = []
    layer = ours.model.layers[1].self_attn
    original = layer.forward
    layer.forward = lambda *a, **k: calls.append(k.get("attention_mask")) or original(*a, **k)
    with torch.no_grad():
        theirs = ref(input_ids=ids, position_ids=positions).logits
        torch.testing.assert_close(ours(input_ids=ids, position_ids=positions).logits, theirs, rtol=1e-4, atol=1e-4)
    assert calls and calls[0] is not None  # transformers' mask reached the layer: the no-mask fast path was skipped


def test_token_chunked_moe_gives_the_same_loss_and_lora_grads(gpt_oss_dir):
    from desktune.memory.tiled_mlp import TiledMLPConfig, set_tiled_mlp

    runs = []
    for tiling in (None, TiledMLPConfig(min_tokens=1, num_chunks=3)):
        model = FastLanguageModel.get_peft_model(_ours(gpt_oss_dir), r=4, use_gradient_checkpointing=False)
        model.train()
        assert set_tiled_mlp(model, tiling) == 2
        torch.manual_seed(5)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_B" in name:
                    param.normal_(0.0, 0.2)
        ids = _ids(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    torch.testing.assert_close(loss_b, loss_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_generate_after_for_inference_matches_transformers_greedy(gpt_oss_dir):
    ref = _reference(gpt_oss_dir).eval()
    ours = FastLanguageModel.for_inference(_ours(gpt_oss_dir))
    ids = _ids(6, batch=1)[:, :6]
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    got = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert got.shape[1] == ids.shape[1] + 8
    assert torch.equal(got, want)
