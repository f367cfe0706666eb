"""GGUF files read back with gguf.GGUFReader: every tensor against the HF model (after
llama.cpp's q/k permutation, Gemma's norm shift, dequantization), hyper-parameters,
tokenizer and chat template."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from desktune.errors import GGUFExportError, UnsupportedModelError
from desktune.export import gguf_arch
from desktune.export.gguf import convert_hf_to_gguf

gguf = pytest.importorskip("gguf")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_oss"]


def _read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def _field(reader, key):
    field = reader.fields[key]
    return field.contents()


def _hf_state(folder):
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}


def _as_hf(name, data, config, family):
    """Undo the exporter's transforms so the GGUF tensor can be compared with the HF one."""
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    if family.permute_qk and name.endswith(("attn_q.weight", "attn_q.bias")):
        data = gguf_arch.unpermute_qk(data, n_head)
    if family.permute_qk and name.endswith(("attn_k.weight", "attn_k.bias")):
        data = gguf_arch.unpermute_qk(data, n_kv)
    if family.norm_shift and name.endswith("norm.weight"):
        data = data - family.norm_shift
    return data


def test_gpt_oss_experts_are_split_and_transposed(trained_folder):
    """HF fuses gate/up in alternating columns of [E, hidden, 2*ff] (x @ W); llama.cpp wants
    ffn_gate_exps/ffn_up_exps as [E, ff, hidden] and ffn_down_exps as [E, hidden, ff]."""
    folder = trained_folder("gpt_oss", steps=0)
    reader, tensors = _read(convert_hf_to_gguf(folder, folder / "m.F32.gguf", "f32"))
    state = _hf_state(folder)
    gate_up = state["model.layers.0.mlp.experts.gate_up_proj"]
    n_exp, hidden, two_ff = gate_up.shape
    gate = np.asarray(tensors["blk.0.ffn_gate_exps.weight"].data).reshape(n_exp, two_ff // 2, hidden)
    up = np.asarray(tensors["blk.0.ffn_up_exps.weight"].data).reshape(n_exp, two_ff // 2, hidden)
    np.testing.assert_array_equal(gate[1, 2], gate_up[1, :, 4])
    np.testing.assert_array_equal(up[1, 2], gate_up[1, :, 5])
    down = state["model.layers.0.mlp.experts.down_proj"]
    got = np.asarray(tensors["blk.0.ffn_down_exps.weight"].data).reshape(n_exp, hidden, two_ff // 2)
    np.testing.assert_array_equal(got[3, :, 1], down[3, 1, :])
    bias = np.asarray(tensors["blk.0.ffn_up_exps.bias"].data).reshape(n_exp, two_ff // 2)
    np.testing.assert_array_equal(bias, state["model.layers.0.mlp.experts.gate_up_proj_bias"][:, 1::2])
    assert _field(reader, "gpt-oss.expert_count") == 4 and _field(reader, "gpt-oss.expert_used_count") == 2
    assert _field(reader, "gpt-oss.rope.scaling.type") == "yarn"
    assert tensors["blk.0.attn_sinks.weight"].tensor_type.name == "F32"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_tensor_round_trips_in_f32(trained_folder, model_type):
    from transformers import AutoConfig

    folder = trained_folder(model_type, steps=0)
    out = convert_hf_to_gguf(folder, folder / "m.F32.gguf", "f32")
    reader, tensors = _read(out)
    config = AutoConfig.from_pretrained(folder)
    family = gguf_arch.family_for(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], config.num_hidden_layers)
    state = _hf_state(folder)
    seen = set()
    for hf_name, hf in state.items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        views = family.views(hf_name, hf.shape) if family.views else [gguf_arch.TensorView(hf_name, None, hf.shape)]
        for view in views:
            name = name_map.get_name(view.name, try_suffixes=(".weight", ".bias"))
            data = np.asarray(tensors[name].data, dtype=np.float32).reshape(view.shape)
            expected = gguf_arch.cut_view(view.part, hf, name.endswith(".bias"))
            np.testing.assert_array_equal(_as_hf(name, data, config, family), expected, err_msg=name)
            seen.add(name)
    extra = set(tensors) - seen
    assert extra == ({"rope_freqs.weight"} if model_type == "llama" else set())
    assert _field(reader, "general.architecture") == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]]


def test_q_and_k_rows_are_interleaved_per_head(trained_folder):
    """Row 1 of a llama.cpp head is HF row head_dim/2 (rotate-half -> interleaved pairs)."""
    folder = trained_folder("llama", steps=0)
    out = convert_hf_to_gguf(folder, folder / "m.perm.gguf", "f32")
    _, tensors = _read(out)
    state = _hf_state(folder)
    hf_k = state["model.layers.0.self_attn.k_proj.weight"]
    k = np.asarray(tensors["blk.0.attn_k.weight"].data).reshape(hf_k.shape)
    hd = hf_k.shape[0] // 2  # 2 kv heads
    np.testing.assert_array_equal(k[0], hf_k[0])
    np.testing.assert_array_equal(k[1], hf_k[hd // 2])
    np.testing.assert_array_equal(k[hd + 1], hf_k[hd + hd // 2])


@pytest.mark.parametrize("method,qtype,atol", [("f16", "F16", 2e-3), ("bf16", "BF16", 2e-2), ("q8_0", "Q8_0", 2e-2)])
def test_python_quantizations_dequantize_close_to_hf(trained_folder, method, qtype, atol):
    folder = trained_folder("llama", steps=0)
    out = convert_hf_to_gguf(folder, folder / f"m.{method}.gguf", method)
    reader, tensors = _read(out)
    state = _hf_state(folder)
    hf = state["model.layers.1.mlp.down_proj.weight"]
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == qtype
    data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(hf.shape)
    np.testing.assert_allclose(data, hf, atol=atol * np.abs(hf).max(), rtol=0)
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"  # 1-D tensors stay f32
    expected_ftype = {"f16": 1, "bf16": 32, "q8_0": 7}[method]
    assert _field(reader, "general.file_type") == expected_ftype


def test_metadata_tokenizer_and_chat_template(trained_folder):
    from transformers import AutoConfig, AutoTokenizer

    folder = trained_folder("llama", steps=0)
    out = convert_hf_to_gguf(folder, folder / "m.meta.gguf", "f16")
    reader, tensors = _read(out)
    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert _field(reader, "llama.block_count") == config.num_hidden_layers
    assert _field(reader, "llama.embedding_length") == config.hidden_size
    assert _field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.bos_token_id] == gguf.TokenType.CONTROL and types[5] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.chat_template") == (folder / "chat_template.jinja").read_text()
    # llama3 rope scaling travels as per-frequency divisors: 1 for short wavelengths, factor for long ones.
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and len(factors) == config.head_dim // 2


def test_vocab_is_padded_to_the_embedding_rows(tmp_path, trained_folder):
    import shutil

    from safetensors.torch import load_file, save_file

    src = trained_folder("qwen2", steps=0)
    folder = tmp_path / "padded"
    shutil.copytree(src, folder)
    state = load_file(str(folder / "model.safetensors"))
    import torch

    n = state["model.embed_tokens.weight"].shape[0]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], torch.zeros(3, state[key].shape[1])])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = n + 3
    (folder / "config.json").write_text(json.dumps(cfg))
    reader, _ = _read(convert_hf_to_gguf(folder, folder / "m.gguf", "f16"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == n + 3 and tokens[-1] == f"[PAD{n + 2}]"
    assert _field(reader, "tokenizer.ggml.token_type")[-1] == gguf.TokenType.UNUSED
    assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"


def test_gemma_metadata(trained_folder):
    folder = trained_folder("gemma2", steps=0)
    reader, tensors = _read(convert_hf_to_gguf(folder, folder / "m.gguf", "f16"))
    assert _field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(50.0)
    assert _field(reader, "gemma2.final_logit_softcapping") == pytest.approx(30.0)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    folder = trained_folder("gemma3_text", steps=0)
    reader, _ = _read(convert_hf_to_gguf(folder, folder / "m.gguf", "f16"))
    assert _field(reader, "gemma3.rope.freq_base") == pytest.approx(1_000_000.0)
    assert _field(reader, "gemma3.rope.freq_base_swa") == pytest.approx(10_000.0)
    assert _field(reader, "gemma3.attention.sliding_window_pattern") == [True] * 5 + [False]


def test_errors_say_what_to_do(tmp_path, trained_folder, monkeypatch):
    folder = trained_folder("llama", steps=0)
    with pytest.raises(GGUFExportError, match="q4_k_m"):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf", "q4_km")
    monkeypatch.setattr("desktune.export.gguf_quant.find_quantizer", lambda: None)
    with pytest.raises(GGUFExportError, match="llama-quantize"):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf", "q4_k_m")
    assert not (tmp_path / "x.gguf").exists()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(GGUFExportError, match="desktune merge"):
        convert_hf_to_gguf(adapter, tmp_path / "x.gguf", "f16")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    with pytest.raises(UnsupportedModelError, match="supported: .*llama"):
        convert_hf_to_gguf(gpt2, tmp_path / "x.gguf", "f16")


def test_sentencepiece_style_tokenizer(trained_folder):
    """BPE with byte fallback (Gemma's layout) becomes llama.cpp's "llama" (SPM) vocab:
    scores rank the merges, <0xXX> pieces are BYTE tokens, no space prefix is added."""
    from transformers import AutoTokenizer

    folder = trained_folder("gemma3_text", steps=0, tokenizer="spm")
    reader, _ = _read(convert_hf_to_gguf(folder, folder / "m.spm.gguf", "f16"))
    tok = AutoTokenizer.from_pretrained(folder)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.tokens") == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is False
    types = _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    byte_a = tok.convert_tokens_to_ids("<0x41>")
    assert types[byte_a] == gguf.TokenType.BYTE and types[tok.bos_token_id] == gguf.TokenType.CONTROL
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    first, last = ["".join(m) for m in (merges[0], merges[-1])]
    assert scores[tok.convert_tokens_to_ids(first)] == 0.0
    assert scores[tok.convert_tokens_to_ids(last)] == -(len(merges) - 1)


def test_k_quants_use_llama_quantize_from_path(tmp_path, trained_folder, monkeypatch):
    """With a `llama-quantize` on PATH (as in the image) the exporter hands it the 16-bit file
    and llama.cpp's type name; here a stand-in records its arguments and copies the file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llama-quantize"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncp "$1" "$2"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    folder = trained_folder("llama", steps=0)
    out = convert_hf_to_gguf(folder, tmp_path / "m.Q5_K_M.gguf", "q5_k_m", threads=3)
    src, dst, ftype, threads = (tmp_path / "args").read_text().split()
    assert (ftype, threads, dst) == ("Q5_K_M", "3", f"{out}.part")
    assert src.endswith("model.F16.gguf") and not os.path.exists(src)  # temporary 16-bit file gone
    reader, _ = _read(out)
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16  # the stand-in's copy


def test_pre_tokenizer_is_named_from_its_split_regex(caplog):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from desktune.export.gguf_tokenizer import PRE_TOKENIZERS, detect_pre_tokenizer

    def tokenizer_json(pre):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return json.loads(tok.to_str())

    for regex, name in PRE_TOKENIZERS.items():
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        assert detect_pre_tokenizer(tokenizer_json(pre)) == name
    assert detect_pre_tokenizer(tokenizer_json(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    odd = pre_tokenizers.Split(Regex(r"\w+|\s+"), behavior="isolated")
    assert detect_pre_tokenizer(tokenizer_json(odd)) == "default"
    assert "unknown pre-tokenizer regex" in caplog.text
