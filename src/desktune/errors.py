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
