"""Chat templates by name and response-only masking on real template output."""

from __future__ import annotations

import copy
import logging

import pytest

from desktune.data import CHAT_TEMPLATES, ResponseMasker, get_chat_template, stop_token_ids, train_on_responses_only
from desktune.data.templates import resolve_template
from desktune.errors import ChatTemplateError

CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]

# What each template trains on for CHAT: one run of labelled tokens per assistant turn.
EXPECTED_RUNS = {
    "llama-3": ["It is 4.<|eot_id|>", "It is 6.<|eot_id|>"],
    "llama-3.1": ["It is 4.<|eot_id|>", "It is 6.<|eot_id|>"],
    "chatml": ["It is 4.<|im_end|>\n", "It is 6.<|im_end|>\n"],
    "qwen-2.5": ["It is 4.<|im_end|>\n", "It is 6.<|im_end|>\n"],
    "qwen3": ["It is 4.<|im_end|>\n", "<think>\n\n</think>\n\nIt is 6.<|im_end|>\n"],
    "gemma-3": ["It is 4.<end_of_turn>\n", "It is 6.<end_of_turn>\n"],
    "gpt-oss": ["<|channel|>final<|message|>It is 4.<|end|>", "<|channel|>final<|message|>It is 6.<|return|>"],
    "alpaca": ["It is 4.<|eot_id|>\n\n", "It is 6.<|eot_id|>\n\n"],
}


@pytest.fixture(scope="module")
def base_tokenizer():
    from desktune.fixtures.tokenizer import make_tokenizer

    return make_tokenizer()


def _tokenizer_for(base, name):
    tok = copy.deepcopy(base)
    tokens = list(CHAT_TEMPLATES[name].special_tokens)
    if tokens:
        tok.add_special_tokens({"additional_special_tokens": tokens})
    return get_chat_template(tok, name)


def _runs(tok, labels):
    """Decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for label in labels + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


def test_every_template_is_covered_by_the_masking_test():
    assert set(EXPECTED_RUNS) == set(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_only_assistant_tokens_carry_labels(base_tokenizer, name):
    tok = _tokenizer_for(base_tokenizer, name)
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    [row] = train_on_responses_only([{"input_ids": ids}], tokenizer=tok)
    assert _runs(tok, row["labels"]) == EXPECTED_RUNS[name]
    # every labelled position carries its own token id (a shift or offset would break this)
    assert all(lab in (-100, tok_id) for lab, tok_id in zip(row["labels"], ids))
    assert len(row["labels"]) == len(ids)


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_generation_prompt_is_a_prefix_of_the_trained_chat(base_tokenizer, name):
    # what the model is prompted with at inference must be exactly what preceded the answer in training
    tok = _tokenizer_for(base_tokenizer, name)
    full = tok.apply_chat_template(CHAT, tokenize=False)
    prompt = tok.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert full.startswith(prompt) and len(full) > len(prompt)


def test_qwen3_keeps_reasoning_of_the_last_turn_only(base_tokenizer):
    tok = _tokenizer_for(base_tokenizer, "qwen3")
    chat = [dict(m) for m in CHAT]
    chat[2]["reasoning_content"] = "early thought"
    chat[4]["reasoning_content"] = "late thought"
    text = tok.apply_chat_template(chat, tokenize=False)
    assert "early thought" not in text
    assert "<|im_start|>assistant\n<think>\nlate thought\n</think>\n\nIt is 6.<|im_end|>" in text


def test_template_sets_eos_to_end_of_turn_when_in_vocab(base_tokenizer):
    tok = _tokenizer_for(base_tokenizer, "chatml")
    assert tok.eos_token == "<|im_end|>"
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    tok = _tokenizer_for(base_tokenizer, "gpt-oss")
    assert tok.eos_token == "<|return|>"


def test_missing_special_tokens_warn_and_keep_eos(base_tokenizer, caplog):
    tok = copy.deepcopy(base_tokenizer)
    with caplog.at_level(logging.WARNING, logger="desktune"):
        get_chat_template(tok, "gemma-3")
    assert "<start_of_turn>" in caplog.text
    assert tok.eos_token == "<|eot_id|>"  # <end_of_turn> is not in this vocabulary


def test_aliases_unknown_names_and_default_system(base_tokenizer):
    assert resolve_template("Llama3.1").name == "llama-3.1"
    assert resolve_template("harmony").name == "gpt-oss"
    with pytest.raises(ChatTemplateError, match="chatml"):
        resolve_template("vicuna-9")
    tok = _tokenizer_for(base_tokenizer, "chatml")
    get_chat_template(tok, "chatml", system_message="Be kind.\nAlways.")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nBe kind.\nAlways.<|im_end|>\n<|im_start|>user\nhi")


def test_marker_merged_with_answer_falls_back_to_stripped_marker(base_tokenizer):
    # "### Response:\n " alone ends in a lone space token; in the text the space joins " the".
    masker = ResponseMasker(base_tokenizer, "### Instruction:\n", "### Response:\n ")
    text = "### Instruction:\nhi\n\n### Response:\n the word.\n\n### Instruction:\nbye\n\n### Response:\n the end."
    ids = base_tokenizer(text, add_special_tokens=False)["input_ids"]
    full = masker.response.ids
    assert not any(ids[i : i + len(full)] == full for i in range(len(ids)))  # the premise of this test
    assert _runs(base_tokenizer, masker(ids)) == [" the word.\n\n", " the end."]


def test_existing_masked_labels_stay_masked(base_tokenizer):
    tok = _tokenizer_for(base_tokenizer, "llama-3")
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    labels = list(ids)
    last = len(ids) - 1
    labels[last] = -100  # e.g. a packing boundary TRL already masked
    out = ResponseMasker(tok, CHAT_TEMPLATES["llama-3"].instruction_part, CHAT_TEMPLATES["llama-3"].response_part)(
        ids, labels
    )
    assert out[last] == -100 and _runs(tok, out)[-1] == "It is 6."


def test_rows_without_response_are_dropped_with_warning(base_tokenizer, caplog):
    tok = _tokenizer_for(base_tokenizer, "llama-3")
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    prompt_only = tok.apply_chat_template(CHAT[:2], tokenize=True, return_dict=True)["input_ids"]
    with caplog.at_level(logging.WARNING, logger="desktune"):
        rows = train_on_responses_only([{"input_ids": ids}, {"input_ids": prompt_only}], tokenizer=tok)
    assert len(rows) == 1 and rows[0]["input_ids"] == ids
    assert "1 train rows have no assistant tokens" in caplog.text


def test_unknown_template_needs_explicit_parts(base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="instruction_part"):
        train_on_responses_only([{"input_ids": [1, 2]}], tokenizer=tok)


def test_gpt_oss_reasoning_is_on_the_analysis_channel_and_trained(base_tokenizer):
    tok = _tokenizer_for(base_tokenizer, "gpt-oss")
    chat = [dict(m) for m in CHAT]
    chat[4]["thinking"] = "3+3 is 6."
    ids = tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    [row] = train_on_responses_only([{"input_ids": ids}], tokenizer=tok)
    assert _runs(tok, row["labels"]) == [
        "<|channel|>final<|message|>It is 4.<|end|>",
        "<|channel|>analysis<|message|>3+3 is 6.<|end|><|start|>assistant<|channel|>final<|message|>It is 6.<|return|>",
    ]


def test_apply_chat_template_text_rows_get_one_bos(base_tokenizer):
    import datasets

    from desktune.data import apply_chat_template

    tok = _tokenizer_for(base_tokenizer, "llama-3.1")
    ds = apply_chat_template(datasets.Dataset.from_list([{"conversations": CHAT}]), tok)
    text = ds[0]["text"]
    assert not text.startswith("<|begin_of_text|>")  # the tokenizer adds it when TRL tokenizes the text
    ids = tok(text)["input_ids"]
    assert ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]


def test_trainer_whose_collator_drops_labels_is_refused(base_tokenizer):
    import torch

    from desktune.errors import DatasetFormatError

    class OldStyleTrainer:  # a collator that rebuilds labels from input_ids, as TRL < 1.0's did
        processing_class = _tokenizer_for(base_tokenizer, "llama-3")
        train_dataset = [{"input_ids": [1, 2, 3]}]

        @staticmethod
        def data_collator(rows):
            ids = torch.tensor([r["input_ids"] for r in rows])
            return {"input_ids": ids, "labels": ids.clone()}

    with pytest.raises(DatasetFormatError, match="ignores the dataset's labels"):
        train_on_responses_only(OldStyleTrainer())
