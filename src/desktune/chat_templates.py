"""`from desktune.chat_templates import get_chat_template, train_on_responses_only` (the Unsloth spelling)."""

from desktune.data.formats import standardize_data_formats, standardize_sharegpt
from desktune.data.masking import train_on_responses_only
from desktune.data.pipeline import apply_chat_template
from desktune.data.templates import CHAT_TEMPLATES, get_chat_template, stop_token_ids

__all__ = [
    "CHAT_TEMPLATES",
    "apply_chat_template",
    "get_chat_template",
    "standardize_data_formats",
    "standardize_sharegpt",
    "stop_token_ids",
    "train_on_responses_only",
]
