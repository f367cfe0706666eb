"""On the GPU: 200 QLoRA steps with desktune and with plain transformers + peft + bitsandbytes,
same random-weight Llama-3.2-1B-shaped model, same seed, same batches: the loss curves agree.

Tolerance: both runs compute in bf16 with different kernels (Triton RMSNorm / SwiGLU / fused
linear+CE / fused 4-bit LoRA against PyTorch + bitsandbytes), so each step's loss carries
bf16 rounding (~0.4% relative per op) that the optimizer then feeds forward. We require the
mean relative gap over all steps below 1.5%, no single step above 4%, and the same overall
drop. A wrong gradient (a missing term, a wrong scale) moves the curve by far more within a
few dozen steps.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

STEPS = 200
BATCH, SEQ = 4, 512


def _llama_1b_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from desktune.fixtures.tokenizer import make_tokenizer

    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    folder = tmp_path_factory.mktemp("llama-1b-shape")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)  # only the files are needed; batches are token ids
    del model
    torch.cuda.empty_cache()
    return str(folder)


def _batches():
    # A fixed pool of 16 random sequences, cycled: a memorisation task whose loss falls steadily.
    gen = torch.Generator().manual_seed(1234)
    pool = torch.randint(0, 128256, (16, SEQ), generator=gen)
    return [pool[(i * BATCH) % 16:(i * BATCH) % 16 + BATCH].cuda() for i in range(STEPS)]


def _train(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for batch in _batches():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)


def test_qlora_loss_curve_matches_plain_peft(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from desktune import FastLanguageModel

    folder = _llama_1b_folder(tmp_path_factory)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=SEQ, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=targets,
                                             use_gradient_checkpointing=True, random_state=0)
    assert model.get_base_model()._desktune_patches["qlora_linear"] == 16 * 7
    ours = _train(model)
    del model
    torch.cuda.empty_cache()

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": 0})
    torch.manual_seed(0)
    plain = get_peft_model(plain, LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = _train(plain)

    gap = (ours - ref).abs() / ref
    print(f"loss desktune {ours[0]:.4f} -> {ours[-1]:.4f}, peft {ref[0]:.4f} -> {ref[-1]:.4f}; "
          f"relative gap mean {gap.mean():.4%} max {gap.max():.4%}")
    assert ref[-1] < 0.7 * ref[0]  # the task does train
    assert gap.mean() < 0.015 and gap.max() < 0.04
