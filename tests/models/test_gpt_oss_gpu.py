"""gpt-oss on CUDA: grouped_mm experts and compiled FlexAttention sinks vs transformers' eager model."""

import copy

import pytest
import torch

from desktune.fixtures.tiny_gpt_oss import tiny_gpt_oss_config

pytestmark = pytest.mark.gpu


def _pair(sliding_window=32):
    from transformers import GptOssForCausalLM

    from desktune.models import registry
    from desktune.models.gpt_oss import GPT_OSS

    config = tiny_gpt_oss_config(vocab_size=256, sliding_window=sliding_window, hidden_size=128,
                                 intermediate_size=128, num_local_experts=8, num_experts_per_tok=4)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = GptOssForCausalLM(config).to("cuda", torch.bfloat16).train()
    ours = copy.deepcopy(ref)
    ours.max_seq_length = 4096
    registry.patch(ours, GPT_OSS, 4096)
    ours.requires_grad_(True)  # the converted experts start frozen (the QLoRA default)
    return ref, ours


def test_full_finetuning_grads_match_transformers_on_cuda():
    ref, ours = _pair()
    ids = torch.randint(0, 256, (2, 300), device="cuda")  # > 2 flex blocks, window 32
    ref_loss = ref(input_ids=ids, labels=ids).loss
    our_loss = ours(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(our_loss.float(), ref_loss.float(), rtol=2e-2, atol=2e-2)
    ref_loss.backward()
    our_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        want = ref_params[name].grad
        if want is None or want.abs().max() == 0:
            continue
        cos = torch.nn.functional.cosine_similarity(param.grad.float().flatten(), want.float().flatten(), 0)
        assert cos > 0.95, (name, cos.item())  # bf16, and a routing flip moves a few tokens


def test_qlora_random_model_trains_on_cuda_with_low_memory():
    from desktune import FastLanguageModel
    from desktune.models import registry
    from desktune.models.gpt_oss import GPT_OSS
    from desktune.models.gpt_oss_load import random_gpt_oss

    config = tiny_gpt_oss_config(vocab_size=256, hidden_size=256, intermediate_size=256, num_local_experts=8,
                                 num_experts_per_tok=4, sliding_window=64)
    model = random_gpt_oss(config, torch.bfloat16, True, "cuda", quantize_attention=False)
    for param in model.parameters():
        param.requires_grad_(False)
    model.max_seq_length = 2048
    registry.patch(model, GPT_OSS, 2048)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (1, 2048), device="cuda")
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
