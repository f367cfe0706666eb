"""Response-only loss: every label outside an assistant turn becomes -100.

Works on token ids, after the chat template and tokenization, so it sees exactly what
the model trains on. A row is scanned for the token ids of `response_part` (the text
that opens an assistant turn) and `instruction_part` (the text that opens a user
turn): tokens after a response marker, up to the next instruction marker, keep their
labels; everything else, the markers included, is masked. Several turns per row and
packed rows (several conversations in one row) are handled the same way.

A marker's tokens can differ inside a chat from its tokens alone when the tokenizer
merges across its end (e.g. a trailing "\\n\\n" merging with the answer's first
characters); if the whole marker is not found in a row, its whitespace-stripped form
is tried and the whitespace-only tokens after it are masked too.
"""

from __future__ import annotations

from typing import Sequence

from desktune.log import logger

IGNORE_INDEX = -100


def _find_all(seq: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Start positions of `pattern` in `seq` (non-overlapping, left to right)."""
    n, m = len(seq), len(pattern)
    if m == 0:
        return []
    first = pattern[0]
    out, i = [], 0
    while i <= n - m:
        if seq[i] == first and list(seq[i : i + m]) == list(pattern):
            out.append(i)
            i += m
        else:
            i += 1
    return out


class _Marker:
    """A chat marker as token ids, plus its whitespace-stripped fallback."""

    def __init__(self, tokenizer, text: str):
        self.text = text
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stripped = text.rstrip()
        self.stripped_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped != text else None
        if not self.ids:
            from desktune.errors import ChatTemplateError

            raise ChatTemplateError(f"marker {text!r} tokenizes to nothing")

    def spans(self, ids: Sequence[int], whitespace_ids: set[int]) -> list[tuple[int, int]]:
        """(start, end) of each occurrence in `ids`; `end` is the first token after the marker."""
        starts = _find_all(ids, self.ids)
        if starts or self.stripped_ids is None:
            return [(s, s + len(self.ids)) for s in starts]
        spans = []
        for s in _find_all(ids, self.stripped_ids):
            end = s + len(self.stripped_ids)
            while end < len(ids) and ids[end] in whitespace_ids:
                end += 1
            spans.append((s, end))
        return spans


def _whitespace_ids(tokenizer, ids: Sequence[int], cache: dict[int, bool]) -> set[int]:
    out = set()
    for token_id in set(ids):
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id]).strip() == "" and token_id not in tokenizer.all_special_ids
        if cache[token_id]:
            out.add(token_id)
    return out


class ResponseMasker:
    """Callable: (input_ids, labels or None) -> labels with non-assistant tokens set to -100."""

    def __init__(self, tokenizer, instruction_part: str, response_part: str):
        self.tokenizer = tokenizer
        self.instruction = _Marker(tokenizer, instruction_part)
        self.response = _Marker(tokenizer, response_part)
        self._ws_cache: dict[int, bool] = {}

    def __call__(self, input_ids: Sequence[int], labels: Sequence[int] | None = None) -> list[int]:
        labels = list(input_ids if labels is None else labels)
        ws = _whitespace_ids(self.tokenizer, input_ids, self._ws_cache)
        # Events along the row: a response marker opens a trained region at its end, an
        # instruction marker closes it at its start.
        events = [(end, start, True) for start, end in self.response.spans(input_ids, ws)]
        events += [(start, start, False) for start, _ in self.instruction.spans(input_ids, ws)]
        events.sort(key=lambda e: e[1])
        out = [IGNORE_INDEX] * len(labels)
        open_at = None
        for position, _, opens in events:
            if opens:
                if open_at is not None:  # two assistant turns in a row: the second header is trained on
                    out[open_at:position] = labels[open_at:position]
                open_at = position
            elif open_at is not None:
                out[open_at:position] = labels[open_at:position]
                open_at = None
        if open_at is not None:
            out[open_at:] = labels[open_at:]
        return out


def _tokenizer_of(obj):
    tok = getattr(obj, "processing_class", None) or getattr(obj, "tokenizer", None)
    return getattr(tok, "tokenizer", tok)  # a multimodal processor wraps the tokenizer


def _default_parts(tokenizer, instruction_part, response_part):
    if instruction_part is not None and response_part is not None:
        return instruction_part, response_part
    from desktune.data.templates import template_of
    from desktune.errors import ChatTemplateError

    template = template_of(tokenizer)
    if template is None:
        raise ChatTemplateError(
            "train_on_responses_only: the tokenizer's chat template is not one of desktune's, so pass "
            "instruction_part= and response_part= (the text that opens a user turn and an assistant turn)"
        )
    return instruction_part or template.instruction_part, response_part or template.response_part


def _mask_dataset(dataset, masker: ResponseMasker, name: str):
    def add_labels(row):
        return {"labels": masker(row["input_ids"], row.get("labels"))}

    def has_labels(row):
        return any(label != IGNORE_INDEX for label in row["labels"])

    if isinstance(dataset, list):
        rows = [{**row, **add_labels(row)} for row in dataset]
        kept = [row for row in rows if has_labels(row)]
        dropped = len(rows) - len(kept)
    else:
        if "input_ids" not in dataset.column_names:
            from desktune.errors import DatasetFormatError

            raise DatasetFormatError(
                f"train_on_responses_only: the {name} dataset is not tokenized (no input_ids column); call it on "
                "an SFTTrainer (which tokenizes on creation) or a tokenized dataset"
            )
        rows = dataset.map(add_labels, desc=f"Masking non-response tokens ({name})")
        kept = rows.filter(has_labels, desc=f"Dropping rows without a response ({name})")
        dropped = len(rows) - len(kept) if hasattr(kept, "__len__") else 0
    if dropped:
        logger.warning(
            "train_on_responses_only: %d %s rows have no assistant tokens left (no response marker %r, or "
            "truncated before it) and were dropped",
            dropped,
            name,
            masker.response.text,
        )
    return kept


def _check_collator_keeps_labels(trainer) -> None:
    """Refuse a trainer whose collator rebuilds labels from input_ids (older TRL): the mask would be lost."""
    collator = getattr(trainer, "data_collator", None)
    if collator is None:
        return
    try:
        batch = collator([{"input_ids": [1, 2, 3], "labels": [1, IGNORE_INDEX, 3]}])
    except Exception:  # a collator that needs other fields: nothing to learn from this probe
        return
    labels = batch.get("labels") if hasattr(batch, "get") else None
    if labels is not None and int(labels[0][1]) != IGNORE_INDEX:
        from desktune.errors import DatasetFormatError

        raise DatasetFormatError(
            f"train_on_responses_only: this trainer's data collator ({type(collator).__name__}) ignores the "
            "dataset's labels, so the response-only mask would be lost; use TRL >= 1.0's SFTTrainer (whose "
            "collator keeps labels) or a collator that pads the labels column as given"
        )


def train_on_responses_only(
    trainer, instruction_part: str | None = None, response_part: str | None = None, tokenizer=None
):
    """Mask every token but the assistant turns to -100 in the trainer's datasets; returns the trainer.

    `trainer` is a TRL `SFTTrainer` (its tokenized train/eval datasets get a `labels`
    column, which TRL's collator uses as is), a tokenized `datasets.Dataset`, or a list of
    {"input_ids": [...]} rows (then a new dataset or list is returned and `tokenizer` is
    required). Without the parts, they come from the tokenizer's desktune chat template.
    """
    tokenizer = tokenizer or _tokenizer_of(trainer)
    if tokenizer is None:
        raise TypeError("train_on_responses_only: pass tokenizer= when masking a dataset or a list of rows")
    instruction_part, response_part = _default_parts(tokenizer, instruction_part, response_part)
    masker = ResponseMasker(tokenizer, instruction_part, response_part)
    if not hasattr(trainer, "train_dataset"):
        return _mask_dataset(trainer, masker, "train")
    _check_collator_keeps_labels(trainer)
    if trainer.train_dataset is not None:
        trainer.train_dataset = _mask_dataset(trainer.train_dataset, masker, "train")
    evals = getattr(trainer, "eval_dataset", None)
    if isinstance(evals, dict):
        trainer.eval_dataset = {k: _mask_dataset(v, masker, f"eval {k}") for k, v in evals.items()}
    elif evals is not None:
        trainer.eval_dataset = _mask_dataset(evals, masker, "eval")
    return trainer
