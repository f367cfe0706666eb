"""GGUF files run in llama.cpp (llama-cpp-python, in a child process) against transformers on
tiny trained models (gguf_helpers): same tokenization of a text, logits close by cosine at
every position of a prompt, same greedy continuation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from desktune.export import gguf_arch
from desktune.export.gguf import convert_hf_to_gguf

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from gguf_helpers import PROMPT, one_thread, prompt_ids  # noqa: E402

CHILD = Path(__file__).with_name("llama_cpp_child.py")
N_GEN = 8


def run_llama_cpp(model: Path, text: str, ids: list[int], n_gen: int = N_GEN) -> dict:
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps({"model": str(model), "text": text, "ids": ids,
                                                                   "n_gen": n_gen})],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"llama.cpp child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_transformers(folder: Path, n_gen: int = N_GEN) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = prompt_ids(tok)
    with torch.no_grad(), one_thread():
        logits = model(torch.tensor([ids])).logits[0].double().numpy()
        out = model.generate(torch.tensor([ids]), max_new_tokens=n_gen, do_sample=False, min_new_tokens=n_gen,
                             pad_token_id=tok.pad_token_id)
    return {"ids": ids, "text_ids": tok(PROMPT)["input_ids"], "logits": logits,
            "generated": out[0, len(ids):].tolist()}


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _check(folder: Path, method: str, min_cos: float) -> np.ndarray:
    out = convert_hf_to_gguf(folder, folder / f"m.{method}.gguf", method, threads=1)
    hf = run_transformers(folder)
    cpp = run_llama_cpp(out, PROMPT, hf["ids"])
    assert cpp["tokens"] == hf["text_ids"], "llama.cpp tokenizes the prompt differently from transformers"
    cos = cosines(cpp["logits"], hf["logits"])
    assert cos.min() > min_cos, f"{method}: logits cosine per position {np.round(cos, 5)}"
    assert cpp["generated"] == hf["generated"]
    return cos


@pytest.mark.parametrize("method,min_cos", [("f16", 0.9999), ("q8_0", 0.999)])
def test_llama_in_llama_cpp_matches_transformers(trained_folder, method, min_cos):
    """Llama with llama3 rope scaling (short original context, so rope_freqs matters)."""
    _check(trained_folder("llama"), method, min_cos)


def test_k_quant_runs_in_llama_cpp(trained_folder):
    """q4_k_m through llama.cpp's quantizer on hidden 256, where k-quant blocks fit every row."""
    folder = trained_folder("llama", hidden=256)
    _check(folder, "q4_k_m", 0.97)
    reader = gguf.GGUFReader(folder / "m.q4_k_m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K"), types  # not a silent Q5_0/Q8_0 fallback
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M


@pytest.mark.parametrize("model_type,tokenizer", [("mistral", "bpe"), ("qwen2", "bpe"), ("qwen3", "bpe"),
                                                  ("gemma2", "bpe"), ("gemma3_text", "spm"), ("gpt_oss", "bpe")])
def test_other_families_in_llama_cpp_match_transformers(trained_folder, model_type, tokenizer):
    """gemma3 runs with a SentencePiece-style tokenizer, the others with byte-level BPE."""
    _check(trained_folder(model_type, tokenizer=tokenizer), "f16", 0.9999)


def test_a_missing_qk_permutation_is_caught(trained_folder, monkeypatch):
    """The check above is sharp enough to see llama.cpp's q/k row order: skipping the
    permutation on the trained model moves the logits well away from transformers'."""
    folder = trained_folder("llama")
    broken = dict(gguf_arch.FAMILIES)
    broken["llama"] = gguf_arch.GGUFFamily("llama", "LLAMA", permute_qk=False)
    monkeypatch.setattr(gguf_arch, "FAMILIES", broken)
    out = convert_hf_to_gguf(folder, folder / "m.unpermuted.gguf", "f16")
    hf = run_transformers(folder)
    cpp = run_llama_cpp(out, PROMPT, hf["ids"])
    cos = cosines(cpp["logits"], hf["logits"])
    assert cos.min() < 0.9, np.round(cos, 5)
    assert cpp["generated"] != hf["generated"]
