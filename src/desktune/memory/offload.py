"""Offloaded checkpointing: each decoder layer's saved input lives in host memory.

Plain (non-reentrant) checkpointing keeps one tensor per decoder layer on the GPU
for the backward recompute: the layer's input, batch x seq x hidden. At long
context that is the largest activation term (Llama-3.1-8B: 32 layers x 8 KiB =
256 KiB per token). `OffloadedCheckpoint` wraps torch's checkpoint in
saved-tensor hooks that see exactly those inputs (the recompute-only tensors inside
the layer go through checkpoint's own, inner hooks):

- pack (forward): the input is copied into pinned host memory (power-of-two
  pieces, see `piece_sizes`) on a side CUDA stream, overlapping the next layer's compute; the GPU block is released to the
  caching allocator (`record_stream` keeps it from reuse until the copy is done).
- unpack (backward, when layer L's recompute starts): wait for layer L's input to
  be back on the GPU, then start copying layer L-1's input on the side stream, so
  that transfer overlaps layer L's recompute and backward.

So at most two layer inputs are on the GPU at once, whatever the layer count. On
CPU tensors (no CUDA stream) the same code runs with plain copies, which is what
the CPU tests check: losses and gradients bit-equal to plain checkpointing.

The prefetch guess (the layer packed before this one comes next) only affects
speed: every unpack makes sure its own tensor is on the device before returning.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from desktune.memory.host import check_host_memory, host_memory

PIECE_UNIT = 1 << 20  # host pieces are power-of-two multiples of 1 MiB


@dataclass
class OffloadStats:
    """Counters for tests and `desktune bench`: what the hooks did."""

    packed: int = 0  # tensors moved to host memory
    bytes_offloaded: int = 0
    prefetch_hits: int = 0  # unpacks whose tensor was already on its way back
    sync_fetches: int = 0  # unpacks that had to copy on the spot
    # pack sequence numbers in unpack order, the most recent ones only (bounded over long runs)
    unpack_order: deque = field(default_factory=lambda: deque(maxlen=1024))


class _Saved:
    """One offloaded tensor: its host pieces and, once fetched, the device copy."""

    __slots__ = ("seq", "pieces", "shape", "dtype", "nbytes", "device", "d2h_done", "back", "h2d_done", "prev",
                 "__weakref__")

    def __init__(self, seq: int, tensor: torch.Tensor, pieces: list[torch.Tensor], d2h_done, prev):
        self.seq = seq
        self.pieces = pieces  # uint8 host tensors holding the bytes in order
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.nbytes = tensor.numel() * tensor.element_size()
        self.d2h_done = d2h_done  # CUDA event after the device-to-host copy (None on CPU)
        self.back: torch.Tensor | None = None  # the device copy while prefetched
        self.h2d_done = None
        self.prev = prev  # weakref to the tensor packed before this one


def piece_sizes(nbytes: int, unit: int = PIECE_UNIT) -> list[int]:
    """Power-of-two sizes (multiples of `unit`) that add up to nbytes rounded up to `unit`.

    torch's pinned-memory cache rounds every request up to a power of two (up to 2x
    the RAM for one tensor); pieces that already are powers of two waste at most
    `unit` per tensor, and the cache reuses them step after step.
    """
    units = -(-nbytes // unit)
    return [unit << bit for bit in range(units.bit_length() - 1, -1, -1) if units >> bit & 1]


def _byte_spans(pieces: list[torch.Tensor], nbytes: int):
    start = 0
    for piece in pieces:
        length = min(piece.numel(), nbytes - start)
        if length <= 0:
            return
        yield piece, start, length
        start += length


class OffloadedCheckpoint:
    """A `_gradient_checkpointing_func` for transformers' GradientCheckpointingLayer.

    Called as `fn(function, *args)`; runs torch's non-reentrant checkpoint with the
    saved inputs moved to host memory. One instance per model (it holds the side
    stream and the host-RAM check); `num_layers` is how many layers use it, for
    that check.
    """

    def __init__(self, num_layers: int, checkpoint_kwargs: dict | None = None, memory_probe=host_memory,
                 piece_unit: int = PIECE_UNIT):
        self.num_layers = max(1, int(num_layers))
        self.checkpoint_kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
        if self.checkpoint_kwargs["use_reentrant"]:
            raise ValueError("offloaded checkpointing needs use_reentrant=False")
        self.stats = OffloadStats()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None
        self._seq = 0
        self._verified_bytes = 0  # per-step host bytes already checked against free RAM
        self._memory_probe = memory_probe  # () -> (available, total) bytes, or None
        self.piece_unit = piece_unit

    def __deepcopy__(self, memo):
        # A copied model gets its own offloader (fresh streams and stats); CUDA streams cannot be copied.
        clone = OffloadedCheckpoint(self.num_layers, dict(self.checkpoint_kwargs), self._memory_probe,
                                    self.piece_unit)
        memo[id(self)] = clone
        return clone

    def __call__(self, function, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **self.checkpoint_kwargs, **kwargs)

    # -- forward --------------------------------------------------------------
    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _check_host(self, tensor: torch.Tensor) -> None:
        per_step = sum(piece_sizes(tensor.numel() * tensor.element_size(), self.piece_unit)) * self.num_layers
        if per_step > self._verified_bytes:
            # Host memory this process already holds from earlier steps is reused by
            # torch's pinned-memory cache; only the growth has to fit.
            check_host_memory(
                per_step - self._verified_bytes,
                what=f"offloaded checkpointing ({self.num_layers} layers x {tuple(tensor.shape)} "
                f"{str(tensor.dtype).removeprefix('torch.')}, {per_step / 2**30:.2f} GiB per step)",
                advice="lower max_seq_length or the batch size, free host RAM, or use "
                "use_gradient_checkpointing=True (keeps the checkpoints on the GPU)",
                memory=self._memory_probe(),
            )
            self._verified_bytes = per_step

    def _pack(self, tensor: torch.Tensor):
        if isinstance(tensor, torch.nn.Parameter) or not tensor.is_floating_point() or tensor.numel() == 0:
            return tensor  # weights persist anyway; empty markers cost nothing
        self._check_host(tensor)
        stream = self._side_stream(tensor.device)
        data = tensor.detach().contiguous().view(-1).view(torch.uint8)
        pinned = stream is not None
        pieces = [torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=pinned)
                  for size in piece_sizes(data.numel(), self.piece_unit)]
        event = None
        if stream is None:
            for piece, start, length in _byte_spans(pieces, data.numel()):
                piece[:length].copy_(data[start:start + length])
        else:
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                for piece, start, length in _byte_spans(pieces, data.numel()):
                    piece[:length].copy_(data[start:start + length], non_blocking=True)
                event = stream.record_event()
            data.record_stream(stream)  # the allocator must not reuse the block before the copy ends
        saved = _Saved(self._seq, tensor, pieces, event, self._last)
        self._seq += 1
        self._last = weakref.ref(saved)
        self.stats.packed += 1
        self.stats.bytes_offloaded += tensor.numel() * tensor.element_size()
        return saved

    # -- backward -------------------------------------------------------------
    def _fetch(self, saved: _Saved) -> None:
        """Start bringing `saved` back to its device (asynchronous on CUDA)."""
        if saved.back is not None:
            return
        stream = self._side_stream(saved.device)
        back = torch.empty(saved.nbytes, dtype=torch.uint8, device=saved.device)
        if stream is None:  # CPU (and devices without streams): plain copies
            for piece, start, length in _byte_spans(saved.pieces, saved.nbytes):
                back[start:start + length].copy_(piece[:length])
        else:
            stream.wait_stream(torch.cuda.current_stream(saved.device))  # `back` may reuse a block still being read
            with torch.cuda.stream(stream):
                stream.wait_event(saved.d2h_done)
                for piece, start, length in _byte_spans(saved.pieces, saved.nbytes):
                    back[start:start + length].copy_(piece[:length], non_blocking=True)
                saved.h2d_done = stream.record_event()
        saved.back = back.view(saved.dtype).view(saved.shape)

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        self.stats.unpack_order.append(saved.seq)
        if saved.back is None:
            self.stats.sync_fetches += 1
            self._fetch(saved)
        else:
            self.stats.prefetch_hits += 1
        tensor = saved.back
        if saved.h2d_done is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.h2d_done)
        # Drop our reference so the device copy dies with the recompute's use of it;
        # a second backward (retain_graph) fetches again from the host copy.
        saved.back, saved.h2d_done = None, None
        previous = saved.prev() if saved.prev is not None else None
        if previous is not None and previous.back is None:
            self._fetch(previous)
        return tensor  # autograd restores requires_grad / grad_fn from its own record
