"""Host RAM: how much is available, and a check that refuses a run that would swap.

Pinned (page-locked) memory cannot be swapped out: asking for more than the
machine has makes the kernel kill processes instead. So offloading checks first
and raises HostMemoryError with what to lower.
"""

from __future__ import annotations

from desktune.errors import HostMemoryError

# Left for the OS, the data loader and Python itself: 1 GiB or 5% of RAM, whichever is larger.
_RESERVE_FRACTION = 0.05
_RESERVE_MIN = 1 << 30


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                values[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return values


def host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of host RAM, or None where it cannot be read."""
    try:
        info = _meminfo()
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    memory = psutil.virtual_memory()
    return int(memory.available), int(memory.total)


def usable_host_bytes(memory: tuple[int, int] | None = None) -> int | None:
    """Available host RAM minus the reserve; None where RAM cannot be read."""
    memory = memory if memory is not None else host_memory()
    if memory is None:
        return None
    available, total = memory
    return max(0, available - max(_RESERVE_MIN, int(total * _RESERVE_FRACTION)))


def check_host_memory(required: int, what: str, advice: str, memory: tuple[int, int] | None = None) -> None:
    """Raise HostMemoryError when `required` more bytes would not fit in free host RAM."""
    memory = memory if memory is not None else host_memory()
    usable = usable_host_bytes(memory)
    if usable is None or required <= usable:
        return
    raise HostMemoryError(
        f"{what} needs {required / 2**30:.2f} GiB more host RAM, but only {usable / 2**30:.2f} GiB of the "
        f"{memory[0] / 2**30:.2f} GiB available can be used (the rest is kept for the system). To fix: {advice}."
    )
