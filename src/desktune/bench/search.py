"""Search for the longest sequence that trains one step under a memory budget.

Pure logic, no GPU: a probe is "run one full step at length L" and its outcome. The
search starts with two short probes (start, 2*start) to measure how peak memory grows
with length, predicts where the line crosses the budget, probes just below and just
above the prediction, and falls back to bisection whenever the prediction does not
halve the bracket (memory that is not linear in length, allocator rounding). It stops
when the shortest failure is within `tolerance` (1%) of the longest success, or at
`max_length`, or when the probe count or time runs out (the bracket so far is then
reported, not a guess).

Processes: a failed probe ends its process (the next one starts fresh, so the
fragmentation an out-of-memory error leaves behind cannot leak into it). After a
success the same process may go on, but only to lengths within `reuse_factor` of the
max_seq_length it was loaded with, since some contenders size buffers from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

OK, OOM, ERROR, TIMEOUT = "ok", "oom", "error", "timeout"


@dataclass(frozen=True)
class SearchSettings:
    budget_bytes: int
    start: int = 1024
    max_length: int = 1 << 20
    tolerance: float = 0.01
    multiple: int = 64
    max_probes: int = 14
    reuse_factor: float = 1.1


@dataclass(frozen=True)
class Probe:
    length: int
    outcome: str  # OK, OOM, ERROR (any other failure) or TIMEOUT
    peak_bytes: int | None = None  # peak memory the step reserved (what the budget limits)
    seconds: float | None = None
    message: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "Probe":
        return cls(**{k: d.get(k) for k in ("length", "outcome", "peak_bytes", "seconds")}, message=d.get("message") or "")


def _bracket(probes: list[Probe]) -> tuple[int, int | None]:
    lo = max((p.length for p in probes if p.outcome == OK), default=0)
    failed = [p.length for p in probes if p.outcome in (OOM, ERROR)]
    return lo, (min(failed) if failed else None)


@dataclass
class SearchState:
    settings: SearchSettings
    probes: list[Probe] = field(default_factory=list)
    stopped: str = ""  # why the search ended early, if it did

    @property
    def successes(self) -> list[Probe]:
        return [p for p in self.probes if p.outcome == OK]

    @property
    def lo(self) -> int:
        return _bracket(self.probes)[0]

    @property
    def hi(self) -> int | None:
        return _bracket(self.probes)[1]

    @property
    def converged(self) -> bool:
        s, (lo, hi) = self.settings, _bracket(self.probes)
        if lo >= s.max_length:
            return True
        if hi is None:
            return False
        return hi <= lo * (1 + s.tolerance) or hi - lo <= s.multiple

    @property
    def done(self) -> bool:
        return self.converged or bool(self.stopped)

    def add(self, probe: Probe) -> None:
        if probe.length in {p.length for p in self.probes}:
            raise ValueError(f"length {probe.length} was probed twice")
        self.probes.append(probe)
        if probe.outcome == ERROR and not self.stopped:
            # Not a memory limit (a kernel bug, an index overflow): bisecting on it would report a wrong number.
            self.stopped = f"a step at {probe.length} tokens failed with an error that is not out-of-memory"
        elif probe.outcome == TIMEOUT and not self.stopped:
            self.stopped = f"the probe at {probe.length} tokens ran out of time"

    def propose(self) -> int | None:
        """The next length to probe, or None when the search is over (a function of the probes so far)."""
        if self.done:
            return None
        return _plan(self.settings, self.probes)[0]

    def result(self) -> dict:
        lo, hi = _bracket(self.probes)
        return {
            "longest_ok": lo or None,
            "shortest_failed": hi,
            "converged": self.converged,
            "probes": len(self.probes),
            "stopped": self.stopped,
            "failure": next((p.message for p in self.probes if p.length == hi and p.outcome == ERROR), ""),
            "history": [asdict(p) for p in self.probes],
        }


def _round(s: SearchSettings, length: float) -> int:
    return max(s.multiple, int(length) // s.multiple * s.multiple)


def _prediction(s: SearchSettings, probes: list[Probe]) -> float | None:
    """Length where the line through the two longest successes' peaks meets the budget."""
    points = sorted((p.length, p.peak_bytes) for p in probes if p.outcome == OK and p.peak_bytes)
    if len(points) < 2:
        return None
    (l1, p1), (l2, p2) = points[-2], points[-1]
    slope = (p2 - p1) / (l2 - l1)
    if slope <= 0:
        return None
    return l2 + (s.budget_bytes - p2) / slope


def _plan(s: SearchSettings, probes: list[Probe]) -> tuple[int | None, bool]:
    """(next length, whether it came from the memory prediction)."""
    lo, hi = _bracket(probes)
    if not probes:
        return _inside(s, probes, _round(s, min(s.start, s.max_length))), False
    if lo == 0:  # even the first probe failed: walk down
        return (_inside(s, probes, _round(s, hi / 2)) if hi > s.multiple else None), False
    guess = _prediction(s, probes)
    if guess is not None and hi is not None and len(probes) >= 2 and _plan(s, probes[:-1])[1]:
        # Safeguard: a predicted probe that did not halve the bracket means the line misleads; bisect.
        before_lo, before_hi = _bracket(probes[:-1])
        if before_hi is not None and hi - lo > (before_hi - before_lo) / 2:
            guess = None
    predicted = False
    if len([p for p in probes if p.outcome == OK]) < 2 and hi is None:
        candidate = 2 * lo  # the second calibration point
    elif guess is not None and guess > lo * (1 + s.tolerance / 2):
        # Aim just under the predicted limit; once a success sits there, the next aim is just over it.
        candidate = max(guess * (1 - s.tolerance / 3), lo * (1 + s.tolerance * 0.9))
        if hi is None:
            candidate = min(candidate, 8 * lo)
        predicted = True
    elif guess is not None and not (hi is None and _last_step_was_small(s, probes)):
        candidate, predicted = lo * (1 + s.tolerance * 0.9), True
    else:
        candidate = 2 * lo if hi is None else (lo + hi) / 2
    if hi is not None and not lo < candidate < hi:
        candidate, predicted = (lo + hi) / 2, False
    return _inside(s, probes, _round(s, min(candidate, s.max_length))), predicted


def _last_step_was_small(s: SearchSettings, probes: list[Probe]) -> bool:
    """The two longest successes lie within 2*tolerance: the line was wrong once already; stop crawling."""
    ok = sorted(p.length for p in probes if p.outcome == OK)
    return len(ok) >= 2 and ok[-1] <= ok[-2] * (1 + 2 * s.tolerance)


def _inside(s: SearchSettings, probes: list[Probe], length: int) -> int | None:
    lo, hi = _bracket(probes)
    seen = {p.length for p in probes}
    if length <= lo or (hi is not None and length >= hi) or length in seen:
        # Rounding met the bracket: step one multiple inside it if there is room.
        length = lo + s.multiple
        if (hi is not None and length >= hi) or length in seen or length > s.max_length:
            return None
    return length


def probe_batch(
    state: SearchState, probe: Callable[[int], Probe], loaded_length: int, deadline: float | None = None
) -> Iterable[Probe]:
    """Run probes in one process: go on after each success while the next length stays within reuse range.

    Yields each probe as soon as it is done (the caller records it before the next starts).
    """
    while True:
        length = state.propose()
        if length is None or length > loaded_length * state.settings.reuse_factor:
            return
        if len(state.probes) >= state.settings.max_probes:
            state.stopped = state.stopped or f"probe limit ({state.settings.max_probes}) reached"
            return
        if deadline is not None and time.time() > deadline:
            state.stopped = state.stopped or "time limit reached"
            return
        result = probe(length)
        state.add(result)
        yield result
        if result.outcome != OK:
            return


def run_search(settings: SearchSettings, run_process: Callable[[SearchState], list[Probe]], deadline=None) -> SearchState:
    """Drive the search over worker processes: `run_process(state)` runs one process's probes and returns them."""
    state = SearchState(settings)
    while not state.done:
        if len(state.probes) >= settings.max_probes:
            state.stopped = f"probe limit ({settings.max_probes}) reached"
            break
        if deadline is not None and time.time() > deadline:
            state.stopped = "time limit reached"
            break
        if state.propose() is None:
            break
        new = run_process(state)
        if not new:
            state.stopped = state.stopped or "a worker process ran no probe (see its log)"
            break
        known = {p.length for p in state.probes}
        for p in new:
            if p.length not in known:
                state.add(p)
    return state
