"""Errors desktune raises on bad input. Each message says what was wrong and what to do."""


class DesktuneError(Exception):
    """Base class of every error desktune raises on purpose."""


class ModelPathError(DesktuneError, FileNotFoundError):
    """The model name is neither a model folder nor a cached hub id."""


class UnsupportedModelError(DesktuneError, ValueError):
    """The model's architecture has no desktune family."""


class SequenceTooLongError(DesktuneError, ValueError):
    """A training batch is longer than the model's max_seq_length."""


class QuantizationUnavailableError(DesktuneError, RuntimeError):
    """4-bit or 8-bit loading was asked for where bitsandbytes cannot run."""


class AdapterFolderConflictError(DesktuneError, FileExistsError):
    """Saving into a folder that already holds a different model or adapter."""


class GPUOutOfMemoryError(DesktuneError, RuntimeError):
    """CUDA ran out of memory; the message says what to lower."""


class DatasetFormatError(DesktuneError, ValueError):
    """A dataset's shape (columns, file type) is not one desktune reads."""


class BadRowError(DesktuneError, ValueError):
    """A dataset row is malformed; `index` is its 0-based position in the loaded dataset."""

    def __init__(self, index: int, reason: str):
        self.index = index
        self.reason = reason
        super().__init__(
            f"row {index}: {reason}. Fix the row, or pass on_bad_row='skip' to leave malformed rows out "
            "(each one is logged)"
        )


class ChatTemplateError(DesktuneError, ValueError):
    """An unknown chat template name, or a template whose markers are not in the tokenized text."""


class TrainConfigError(DesktuneError, ValueError):
    """A training config (YAML or key=value override) has an unknown key or a wrong value."""


class GGUFExportError(DesktuneError, RuntimeError):
    """A GGUF export could not be written (unknown method, missing llama.cpp quantizer, bad folder)."""


class HostMemoryError(DesktuneError, MemoryError):
    """Host (CPU) RAM is too small for what was asked, e.g. offloaded checkpoints of a long sequence."""


class DistributedSetupError(DesktuneError, RuntimeError):
    """A multi-process run (torchrun / accelerate launch) is set up wrongly: launcher variables, GPUs, sharding."""
