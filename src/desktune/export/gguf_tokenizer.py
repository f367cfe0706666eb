"""The tokenizer part of a GGUF file: token list, types, scores or merges, special ids,
the pre-tokenizer name llama.cpp keys its split regex on, and the chat template.

Two tokenizer kinds cover the supported families: byte-level BPE ("gpt2" in llama.cpp:
Llama 3, Qwen, Mistral's Tekken) and SentencePiece-style BPE with byte fallback
("llama": Gemma, Mistral v1/v2), read from tokenizer.model when present, else from
tokenizer.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from desktune.errors import UnsupportedModelError
from desktune.log import logger

# Pre-tokenizer split regexes (as stored in tokenizer.json) -> llama.cpp's pre-tokenizer name.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_O200K_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_REGEX = (  # Mistral Nemo and later
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2", _O200K_REGEX: "gpt-4o", _TEKKEN_REGEX: "tekken"}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def write_tokenizer(writer: Any, folder: Path, n_vocab: int) -> None:
    """Add the tokenizer of the HF model folder to the GGUF writer; the token list is padded
    to n_vocab (the embedding rows), which llama.cpp requires."""
    import gguf

    tok_json = _load_json(folder / "tokenizer.json")
    model = (tok_json or {}).get("model", {})
    if tok_json and model.get("type") == "BPE" and not model.get("byte_fallback", False):
        tokens, types = _bpe_tokens(tok_json, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(detect_pre_tokenizer(tok_json))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        load_merges = True
    elif (folder / "tokenizer.model").is_file() or (tok_json and model.get("type") == "BPE"):
        tokens, scores, types = _spm_tokens(folder, tok_json, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(tok_json))
        load_merges = False
    else:
        raise UnsupportedModelError(
            f"{folder} has no tokenizer.json with a BPE model and no tokenizer.model; save the tokenizer "
            "into the model folder (tokenizer.save_pretrained(folder)) before exporting to GGUF."
        )
    special = gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None:
        logger.warning("%s has no chat template; the GGUF file will have none (llama.cpp falls back to chatml)", folder)


def detect_pre_tokenizer(tok_json: dict[str, Any]) -> str:
    """llama.cpp picks its split regex by name; name it from the regex tokenizer.json uses."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
            logger.warning(
                "unknown pre-tokenizer regex %r: llama.cpp will split text with its default regex, so its "
                "tokenization can differ from transformers'", regex,
            )
            return "default"
    if any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in steps):
        return "gpt-2"
    logger.warning("no pre-tokenizer regex found; llama.cpp will use its default split")
    return "default"


def _bpe_tokens(tok_json: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in tok_json["model"]["vocab"].items()}
    for added in tok_json.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        # llama.cpp matches added tokens on the raw text, before byte-level encoding.
        by_id[added["id"]] = (added["content"], kind)
    return _pad(by_id, n_vocab)


def _spm_tokens(folder: Path, tok_json: dict[str, Any] | None,
                n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    import gguf

    by_id: dict[int, tuple[str, int]] = {}
    scores: dict[int, float] = {}
    if (folder / "tokenizer.model").is_file():
        vocab = gguf.SentencePieceVocab(folder)
        for i, (text, score, kind) in enumerate(vocab.all_tokens()):
            by_id[i] = (text.decode("utf-8"), int(kind))
            scores[i] = score
    else:
        assert tok_json is not None
        # BPE with byte fallback: llama.cpp's SPM tokenizer merges the highest-scoring pair
        # first, so a token's score is minus the rank of the merge that makes it.
        model = tok_json["model"]
        rank = {}
        for r, merge in enumerate(model.get("merges", [])):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            rank.setdefault(left + right, r)
        unk = model.get("unk_token")
        for text, i in model["vocab"].items():
            kind = gguf.TokenType.NORMAL
            if _BYTE_TOKEN.fullmatch(text):
                kind = gguf.TokenType.BYTE
            elif text == unk:
                kind = gguf.TokenType.UNKNOWN
            by_id[i] = (text, kind)
            scores[i] = -float(rank[text]) if text in rank else 0.0
    for added in (tok_json or {}).get("added_tokens", []):
        if added["id"] in by_id and by_id[added["id"]][1] != gguf.TokenType.NORMAL:
            continue
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
        scores.setdefault(added["id"], 0.0)
    tokens, types = _pad(by_id, n_vocab)
    return tokens, [scores.get(i, -1000.0) for i in range(n_vocab)], types


def _pad(by_id: dict[int, tuple[str, int]], n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    if by_id and max(by_id) >= n_vocab:
        raise UnsupportedModelError(
            f"the tokenizer has token id {max(by_id)} but the model's embedding has only {n_vocab} rows; "
            "call model.resize_token_embeddings(len(tokenizer)) before saving."
        )
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def _adds_space_prefix(tok_json: dict[str, Any] | None) -> bool:
    if not tok_json:
        return True  # a bare tokenizer.model: SentencePiece's default
    normalizer = tok_json.get("normalizer") or {}
    norms = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    if any(n.get("type") == "Prepend" for n in norms):
        return True
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps)


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
