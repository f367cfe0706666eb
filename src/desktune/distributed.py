"""Several processes on one or more machines: which process am I, which device is mine, who writes.

desktune has no distributed engine of its own. A launcher (`torchrun`, `accelerate launch`)
starts one process per GPU and tells each who it is through RANK, LOCAL_RANK, WORLD_SIZE
and LOCAL_WORLD_SIZE (torchrun's contract, which accelerate follows); transformers' Trainer
then wraps the model in DistributedDataParallel and splits the batches. What is left for
desktune, and lives here:

- each process loads its copy of the model onto *its* GPU (`device_map()`), not all onto GPU 0;
- only the main process (rank 0) logs progress, writes checkpoints and exports
  (`is_main_process()`, `quiet_other_ranks()`, `wait_for_everyone()`);
- sharding a model that does not fit one GPU with PyTorch's FSDP2 (`shard_model()`): each
  decoder layer becomes one `fully_shard` unit, so every process holds 1/N of the (4-bit or
  16-bit) base weights and all-gathers one layer at a time; LoRA weights are sharded and
  trained like any other parameter (`save_sharded_adapter()` gathers and writes them).

Nothing happens at import; with no launcher every helper answers "one process, rank 0".
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from desktune.log import logger


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0  # this process among all processes of the job
    local_rank: int = 0  # this process among those on this machine (= its GPU index)
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        from desktune.errors import DistributedSetupError

        raise DistributedSetupError(
            f"{name}={value!r} is not a whole number; it is set by the launcher (torchrun / accelerate launch): "
            "start the job with one of them instead of setting it by hand"
        ) from None


def process_info() -> ProcessInfo:
    """Who this process is: from an initialised process group, else from the launcher's variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        return ProcessInfo(rank, _env_int("LOCAL_RANK", rank % local_world), world, local_world)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    info = ProcessInfo(rank, _env_int("LOCAL_RANK", rank % max(1, local_world)), world, local_world)
    if not 0 <= info.rank < info.world_size or not 0 <= info.local_rank < max(1, info.local_world_size):
        from desktune.errors import DistributedSetupError

        raise DistributedSetupError(
            f"inconsistent launcher variables RANK={info.rank} LOCAL_RANK={info.local_rank} "
            f"WORLD_SIZE={info.world_size} LOCAL_WORLD_SIZE={info.local_world_size}: start the job with torchrun or "
            "accelerate launch (they set these), or unset them for a single process"
        )
    return info


def is_main_process() -> bool:
    return process_info().is_main


def local_device() -> torch.device:
    """This process's GPU: cuda:LOCAL_RANK under a launcher, else the current CUDA device; or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" not in os.environ:  # no launcher: respect torch.cuda.set_device of the caller
        return torch.device("cuda", torch.cuda.current_device())
    info = process_info()
    count = torch.cuda.device_count()
    if count == 1:  # the launcher (e.g. SLURM) gave each process only its own GPU
        return torch.device("cuda", 0)
    if info.local_rank >= count:
        from desktune.errors import DistributedSetupError

        raise DistributedSetupError(
            f"this process has LOCAL_RANK {info.local_rank} but only {count} GPU(s) are visible: start at most "
            f"{count} processes per machine (torchrun --nproc-per-node {count}), or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", info.local_rank)


def device_map():
    """The `device_map` that loads a whole model onto this process's device.

    Under a launcher each process must own one GPU: a quantised model loaded with
    `device_map="auto"` would be split across all GPUs (pipeline style, which DDP cannot
    wrap), and `cuda.current_device()` is still 0 in every process before the Trainer runs.
    """
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # bitsandbytes and Triton launch on the current device
        return {"": device.index}
    return "cpu"


def quiet_other_ranks() -> None:
    """Only rank 0 prints desktune's info messages; the others keep warnings and errors.

    Sets the level of the "desktune" logger of this process (the user's own logging
    configuration is left as it is on rank 0).
    """
    info = process_info()
    if info.is_distributed and not info.is_main and logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)


def wait_for_everyone() -> None:
    """A barrier across the job's processes (nothing without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. to fill a cache), then the others; with one process, just runs it."""
    info = process_info()
    if not info.is_main:
        wait_for_everyone()
    try:
        yield
    finally:
        if info.is_main:
            wait_for_everyone()


# --- FSDP2 ---------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a (PEFT-wrapped) causal LM, each one FSDP unit."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:  # older/custom models: the usual `model.layers` ModuleList
        for module in model.modules():
            if isinstance(getattr(module, "layers", None), nn.ModuleList):
                layers = list(module.layers)
                break
    return layers


def shard_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """Shard `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`) and return it.

    One unit per decoder layer, then the root (embeddings, final norm, LM head). Frozen and
    trainable parameters may share a unit (FSDP2 shards each parameter on its own), so a
    PEFT model keeps its LoRA weights next to the frozen base weights they adapt. Needs an
    initialised process group (the Trainer's, or `torch.distributed.init_process_group`).
    """
    from torch.distributed.fsdp import fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        from desktune.errors import DistributedSetupError

        raise DistributedSetupError(
            "shard_model needs a process group: launch with torchrun / accelerate launch and call "
            "torch.distributed.init_process_group() first (the Trainer does it for you)"
        )
    layers = decoder_layers(model)
    if not layers:
        from desktune.errors import DistributedSetupError

        raise DistributedSetupError(
            f"{type(model).__name__} has no decoder layers desktune recognises, so FSDP2 would gather the whole "
            "model at once; use DDP (one full copy per GPU) for this model"
        )
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    logger.info("FSDP2: %d decoder layers sharded over %d processes", len(layers), process_info().world_size)
    return model


def save_sharded_adapter(model: nn.Module, save_directory) -> None:
    """Save the LoRA adapter of an FSDP2-sharded PEFT model: call it on EVERY rank.

    Each trainable weight is a DTensor holding 1/N of the rows; `full_tensor()` gathers it (a
    collective, hence every rank), then rank 0 alone writes a normal PEFT adapter folder.
    """
    from torch.distributed.tensor import DTensor

    if not hasattr(model, "peft_config"):
        from desktune.errors import DistributedSetupError

        raise DistributedSetupError("save_sharded_adapter needs a PEFT model (from get_peft_model)")
    full = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensor = param.full_tensor() if isinstance(param, DTensor) else param
            full[name] = tensor.detach().cpu()
    if is_main_process():
        model.save_pretrained(save_directory, state_dict=full)
    wait_for_everyone()

