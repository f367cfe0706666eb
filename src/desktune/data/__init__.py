"""Datasets, chat templates and response-only masking.

Heavy libraries (datasets, transformers) are imported inside the functions, so
importing this package is cheap.
"""

from desktune.data.formats import (
    FORMATS,
    detect_format,
    load_rows,
    standardize_data_formats,
    standardize_sharegpt,
)
from desktune.data.masking import ResponseMasker, train_on_responses_only
from desktune.data.pipeline import apply_chat_template, prepare_dataset
from desktune.data.templates import CHAT_TEMPLATES, get_chat_template, stop_token_ids
from desktune.data.validate import check_dataset

__all__ = [
    "CHAT_TEMPLATES",
    "FORMATS",
    "ResponseMasker",
    "apply_chat_template",
    "check_dataset",
    "detect_format",
    "get_chat_template",
    "load_rows",
    "prepare_dataset",
    "standardize_data_formats",
    "standardize_sharegpt",
    "stop_token_ids",
    "train_on_responses_only",
]
