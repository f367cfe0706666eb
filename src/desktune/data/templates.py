"""Chat templates by name: `get_chat_template(tokenizer, "llama-3.1")`.

Each template is a jinja string in the format the model family was trained on, with
the markers `train_on_responses_only` needs (where a user turn and an assistant turn
begin) and the token that ends an assistant turn (set as the tokenizer's eos, so
generation stops there and TRL closes plain-text rows with it). The templates render
`{"role", "content"}` messages; run ShareGPT data through `standardize_sharegpt` first.
"""

from __future__ import annotations

from dataclasses import dataclass

from desktune.log import logger


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    eos_token: str | None  # ends an assistant turn; None: keep the tokenizer's own eos
    stop_tokens: tuple[str, ...]  # every token that ends generation
    instruction_part: str  # text that opens a user turn
    response_part: str  # text that opens an assistant turn (masking starts after it)
    special_tokens: tuple[str, ...] = ()  # markers that must be single tokens in the vocabulary


_LLAMA3_TURNS = (
    "{%- for message in loop_messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA3 = "{{- bos_token }}{%- set loop_messages = messages %}" + _LLAMA3_TURNS

# Llama 3.1+ always opens with a system block carrying the knowledge cut-off and a date.
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
    "Today Date: ' + date_string + '\\n\\n' + system_message + '<|eot_id|>' }}" + _LLAMA3_TURNS
)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN25 = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML
)

# Qwen3: the assistant turns after the last user message open with a <think> block (empty when
# the row has no `reasoning_content`), which is what the generation prompt with
# enable_thinking=False produces too; reasoning of earlier turns is dropped, as Qwen3's own
# template does.
QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + (message.get('reasoning_content') or '') | trim + '\\n</think>\\n\\n'"
    " + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Gemma 3 has no system role: the system text opens the first user turn; the assistant is "model".
GEMMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_prefix = messages[0]['content'] | trim + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# gpt-oss speaks OpenAI's harmony format: a fixed system header, the user's system prompt as
# developer instructions, reasoning on the analysis channel, answers on the final channel. The
# last assistant turn ends with <|return|> (what generation stops on), earlier ones with <|end|>;
# like gpt-oss's own template, only the last turn keeps its reasoning.
GPT_OSS = (
    "{%- if reasoning_effort is not defined %}{%- set reasoning_effort = 'medium' %}{%- endif %}"
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Knowledge cutoff: 2024-06\\n' }}"
    "{%- if date_string is defined %}{{- 'Current date: ' + date_string + '\\n' }}{%- endif %}"
    "{{- '\\nReasoning: ' + reasoning_effort + '\\n\\n# Valid channels: analysis, commentary, final. "
    "Channel must be included for every message.<|end|>' }}"
    "{%- set loop_messages = messages %}"
    "{%- if messages[0]['role'] in ['system', 'developer'] %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + messages[0]['content'] | trim + '<|end|>' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set thinking = message.get('thinking') or message.get('reasoning_content') %}"
    "{%- if thinking and loop.last %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + thinking | trim + '<|end|>' }}"
    "{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message['content'] | trim"
    " + ('<|return|>' if loop.last else '<|end|>') }}"
    "{%- else %}"
    "{{- '<|start|>' + message['role'] + '<|message|>' + message['content'] | trim + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

ALPACA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] != 'system' %}{{- '" + ALPACA_SYSTEM + "\\n\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] | trim + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}"
    "{%- else %}{{- '### Response:\\n' + message['content'] | trim + eos_token + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

_LLAMA_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

_TEMPLATES = (
    ChatTemplate(
        "llama-3", LLAMA3, "<|eot_id|>", ("<|eot_id|>",),
        "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n",
        _LLAMA_TOKENS,
    ),
    ChatTemplate(
        "llama-3.1", LLAMA31, "<|eot_id|>", ("<|eot_id|>", "<|eom_id|>"),
        "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n",
        _LLAMA_TOKENS,
    ),
    ChatTemplate(
        "chatml", CHATML, "<|im_end|>", ("<|im_end|>",), "<|im_start|>user\n", "<|im_start|>assistant\n",
        _CHATML_TOKENS,
    ),
    ChatTemplate(
        "qwen-2.5", QWEN25, "<|im_end|>", ("<|im_end|>",), "<|im_start|>user\n", "<|im_start|>assistant\n",
        _CHATML_TOKENS,
    ),
    ChatTemplate(
        "qwen3", QWEN3, "<|im_end|>", ("<|im_end|>",), "<|im_start|>user\n", "<|im_start|>assistant\n",
        _CHATML_TOKENS,
    ),
    ChatTemplate(
        "gemma-3", GEMMA3, "<end_of_turn>", ("<end_of_turn>",), "<start_of_turn>user\n", "<start_of_turn>model\n",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    ChatTemplate(
        "gpt-oss", GPT_OSS, "<|return|>", ("<|return|>", "<|call|>"), "<|start|>user<|message|>", "<|start|>assistant",
        ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"),
    ),
    ChatTemplate("alpaca", ALPACA, None, (), "### Instruction:\n", "### Response:\n"),
)

CHAT_TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _TEMPLATES}

# Other spellings users type (Unsloth's among them) -> canonical name.
ALIASES = {
    "llama3": "llama-3",
    "llama-31": "llama-3.1",
    "llama3.1": "llama-3.1",
    "llama-3.2": "llama-3.1",
    "llama-3.3": "llama-3.1",
    "qwen2.5": "qwen-2.5",
    "qwen-25": "qwen-2.5",
    "qwen-3": "qwen3",
    "gemma3": "gemma-3",
    "gemma": "gemma-3",
    "gptoss": "gpt-oss",
    "harmony": "gpt-oss",
}


def resolve_template(name: str) -> ChatTemplate:
    from desktune.errors import ChatTemplateError

    key = name.lower().strip()
    key = ALIASES.get(key, key)
    if key not in CHAT_TEMPLATES:
        raise ChatTemplateError(
            f"unknown chat template {name!r}; choose one of {', '.join(CHAT_TEMPLATES)} "
            "(or pass a jinja string)"
        )
    return CHAT_TEMPLATES[key]


def _in_vocab(tokenizer, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and token_id != tokenizer.unk_token_id


def get_chat_template(tokenizer, chat_template: str = "chatml", map_eos_token: bool = True, system_message=None):
    """Set `tokenizer.chat_template` to the named template (or a jinja string) and return the tokenizer.

    With `map_eos_token`, the template's end-of-turn token becomes the tokenizer's eos when
    the vocabulary has it. Markers missing from the vocabulary are logged: they would be
    split into several ordinary tokens, which trains but wastes context and is not what
    the model saw in pre-training; add them as special tokens (and resize the embeddings)
    or pick the model's own template.
    """
    if "{%" in chat_template or "{{" in chat_template:  # a raw jinja template
        tokenizer.chat_template = chat_template
        return tokenizer
    template = resolve_template(chat_template)
    jinja = template.jinja
    if system_message is not None:
        # A default system prompt, used when a conversation brings none.
        default = "{%- if messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', 'content': "
        default += repr(system_message) + "}] + messages %}{%- endif %}"
        jinja = default + jinja
    tokenizer.chat_template = jinja
    missing = [t for t in template.special_tokens if not _in_vocab(tokenizer, t)]
    if missing:
        logger.warning(
            "chat template %r: the tokenizer has no token for %s; they will be split into ordinary "
            "tokens. Use the model's own template, or add them with tokenizer.add_special_tokens(...) "
            "and model.resize_token_embeddings(len(tokenizer))",
            template.name,
            ", ".join(missing),
        )
    if map_eos_token and template.eos_token and _in_vocab(tokenizer, template.eos_token):
        tokenizer.eos_token = template.eos_token
    return tokenizer


def template_of(tokenizer) -> ChatTemplate | None:
    """The registered template the tokenizer uses, if its jinja is one of ours (with or without a system default)."""
    current = getattr(tokenizer, "chat_template", None) or ""
    for template in CHAT_TEMPLATES.values():
        if current == template.jinja:
            return template
    for template in CHAT_TEMPLATES.values():
        if current.endswith(template.jinja):
            return template
    return None


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end generation under the tokenizer's template (for `generate(eos_token_id=...)`)."""
    template = template_of(tokenizer)
    tokens = list(template.stop_tokens) if template else []
    if tokenizer.eos_token and tokenizer.eos_token not in tokens:
        tokens.append(tokenizer.eos_token)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens if _in_vocab(tokenizer, t)]
