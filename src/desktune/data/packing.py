"""Padding-free packing: a batch of short examples becomes one row, no padding.

`PaddingFreeCollator` concatenates the examples of a batch into a single row and
returns, besides input_ids and labels:

- position_ids restarting at 0 for each example (so RoPE sees each example as
  a sequence of its own), and
- cu_seq_lens_q/k, max_length_q/k: the example boundaries, which varlen flash
  attention (transformers' flash_attention_2/3 and desktune's varlen attention,
  models/attention.py) reads directly.

No attention_mask is returned on purpose: transformers (>= 4.5x, incl. 5.x)
builds a block-diagonal causal mask from restarting position_ids for sdpa /
eager / flex when attention_mask is None, so no token attends across examples.
It also returns use_cache=False: with a cache, transformers does not look for
packing and the examples would attend to each other. The first label of every example is -100: otherwise the last token of example k
would be trained to predict the first token of example k+1.

This is the batch TRL's own `DataCollatorForLanguageModeling(padding_free=True)`
(SFTConfig(padding_free=True)) makes; this collator also honours TRL's
completion_mask / assistant_masks columns, so it can stand in for it in a plain
Trainer or a custom loop. `padding_free_is_exact(model)` says when packing gives
the same per-example losses as padded batches (docs/long-context.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

# Attention implementations whose masks (or varlen kernels) keep packed examples apart.
EXACT_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "desktune_varlen")


def _as_list(values) -> list[int]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


@dataclass
class PaddingFreeCollator:
    """Collate tokenized examples ({"input_ids", optional "labels" / "completion_mask" /
    "assistant_masks"}) into one padding-free row.

    pad_to_multiple_of: pad the row's end with a dummy example of `pad_token_id`
    (its own positions, labels -100), e.g. for kernels that like round sizes.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    ignore_index: int = -100

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("PaddingFreeCollator got an empty batch")
        ids, labels, positions, lengths = [], [], [], []
        for index, example in enumerate(examples):
            tokens = _as_list(example["input_ids"])
            if not tokens:
                raise ValueError(f"example {index} of the batch has no tokens; drop empty rows before training")
            target = _as_list(example["labels"]) if "labels" in example else list(tokens)
            for key in ("completion_mask", "assistant_masks"):
                if key in example:  # TRL's masks: 1 where the loss counts
                    keep = _as_list(example[key])
                    target = [t if k else self.ignore_index for t, k in zip(target, keep)]
            if len(target) != len(tokens):
                raise ValueError(f"example {index}: {len(target)} labels for {len(tokens)} input_ids")
            target[0] = self.ignore_index  # never predicted from the previous example
            ids += tokens
            labels += target
            positions += range(len(tokens))
            lengths.append(len(tokens))
        if self.pad_to_multiple_of:
            pad = -len(ids) % self.pad_to_multiple_of
            if pad:
                ids += [self.pad_token_id] * pad
                labels += [self.ignore_index] * pad
                positions += range(pad)
                lengths.append(pad)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            # transformers skips the packed-sequence mask when a KV cache is in use,
            # and a model in train mode still makes one if config.use_cache is True.
            "use_cache": False,
        }


def padding_free_is_exact(model) -> bool:
    """True when packed batches give this model the same per-example results as
    padded ones: its attention keeps examples apart (EXACT_ATTENTION) and
    transformers can read packing from position_ids."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in EXACT_ATTENTION:
        return False
    # Soft-capped attention (Gemma 2) runs eager; eager honours the packed mask.
    return True


def use_padding_free(model, per_device_batch_size: int, packing: bool = False) -> bool:
    """desktune's default for SFTConfig(padding_free=...): on where it is exact and
    there is something to gain (more than one example per batch, or packing)."""
    return padding_free_is_exact(model) and (per_device_batch_size > 1 or packing)


def packed_position_ids(lengths: Sequence[int]) -> torch.Tensor:
    """[1, sum(lengths)] positions restarting at 0 for each length (for tests and tools)."""
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
