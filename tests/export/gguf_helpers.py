"""Tiny trained models for the GGUF tests: byte-level BPE and SentencePiece-style tokenizers
built in code, and small models of each family trained for ~120 steps to copy the token
COPY_OFFSET places back. Only relative positions solve that task, so the logits depend on
the rope settings and the q/k row order (a random model barely notices either)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

CORPUS = [
    "the cat sat on the mat and looked at the red ball.",
    "a dog ran in the park with a small stick in its mouth.",
    "one two three four five six seven eight nine ten.",
    "alice wrote a letter to bob about the weather in paris.",
    "the quick brown fox jumps over the lazy dog every day.",
    "we bake bread in the morning and eat soup at night.",
]
PROMPT = "the quick brown fox"
COPY_OFFSET = 3
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_tokenizer():
    """A Llama-3-style byte-level BPE tokenizer (same split regex, specials, BOS on encode)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(model_type: str, vocab_size: int, hidden: int):
    from transformers import AutoConfig

    heads = 4
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    if model_type == "llama":
        # llama3 rope scaling with a short original context, so the rope_freqs factors matter.
        common["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 32}
    if model_type == "qwen3":
        common["head_dim"] = 2 * hidden // heads  # differs from hidden/heads, as in real Qwen3
    if model_type in ("gemma2", "gemma3_text"):
        common.update(head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads, tie_word_embeddings=True,
                      hidden_activation="gelu_pytorch_tanh")
    if model_type == "gpt_oss":
        common.update(head_dim=hidden // heads, num_local_experts=4, num_experts_per_tok=2, intermediate_size=hidden,
                      sliding_window=8)  # a window shorter than the prompt, so it matters
    if model_type == "gemma3_text":
        common["num_hidden_layers"] = 6  # one full-attention layer after five sliding ones
    return AutoConfig.for_model(model_type, **common)


def copy_ids(tokenizer) -> list[int]:
    """Ordinary (non-special) token ids the corpus uses: the alphabet of the training task."""
    special = set(tokenizer.all_special_ids)
    return sorted({i for text in CORPUS for i in tokenizer(text)["input_ids"]} - special)


def prompt_ids(tokenizer, length: int = 14, seed: int = 123) -> list[int]:
    import torch

    alphabet = torch.tensor(copy_ids(tokenizer))
    pick = torch.randint(len(alphabet), (length,), generator=torch.Generator().manual_seed(seed))
    return [tokenizer.bos_token_id] + alphabet[pick].tolist()


def train_tiny(model, tokenizer, steps: int, seed: int = 0) -> float:
    """Teach the model to repeat the token COPY_OFFSET places back in random sequences: a task
    only relative positions solve, so the logits depend on the rope (and q/k row order)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    alphabet = torch.tensor(copy_ids(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    model.train()
    with one_thread():
        for _ in range(steps):
            x = alphabet[torch.randint(len(alphabet), (16, 24), generator=gen)]
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits[:, COPY_OFFSET:].flatten(0, 1), x[:, :-COPY_OFFSET].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    return float(loss.detach())


@contextlib.contextmanager
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy 2-core machine torch's
    spinning worker threads made these steps ~30x slower (measured: 4 s vs 125 s for 120 steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_model_folder(folder: Path, model_type: str, hidden: int = 64, steps: int = 120,
                       tokenizer: str = "bpe") -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = make_spm_tokenizer() if tokenizer == "spm" else make_tokenizer()
    config = make_config(model_type, vocab_size=len(tok), hidden=hidden)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loss = train_tiny(model, tok, steps)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "train_loss.json").write_text(json.dumps({"loss": loss}))
    return folder


def make_spm_tokenizer():
    """A Gemma-style tokenizer: BPE with byte fallback over "▁"-joined text (SentencePiece
    layout in tokenizer.json, no tokenizer.model), <bos> added on encode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for text in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(text, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B:1",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
        "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    return fast
