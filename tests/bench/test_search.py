"""The memory-budget search, driven by fake probes (no GPU): brackets, convergence, process rules."""

from __future__ import annotations

import time

import pytest

from desktune.bench.search import (
    ERROR,
    OK,
    OOM,
    TIMEOUT,
    Probe,
    SearchSettings,
    SearchState,
    probe_batch,
    run_search,
)

GIB = 1 << 30


def memory_model(base: float, per_token: float, quadratic: float = 0.0):
    """A fake contender: peak(L) = base + per_token*L + quadratic*L^2; it fails above the budget."""

    def probe_for(budget: int):
        def probe(length: int) -> Probe:
            peak = base + per_token * length + quadratic * length * length
            if peak > budget:
                return Probe(length, OOM, None, 0.01, "CUDA out of memory")
            return Probe(length, OK, int(peak), 0.01)

        return probe

    return probe_for


def drive(settings: SearchSettings, probe, deadline=None):
    """Run the search the way the runner does: each process loads for its first length and stops at a failure."""
    processes: list[list[Probe]] = []

    def run_process(state: SearchState) -> list[Probe]:
        mine = SearchState(settings, list(state.probes))
        first = mine.propose()
        loaded = 2 * first if not state.probes else first
        ran = list(probe_batch(mine, probe, loaded))
        processes.append(ran)
        return ran

    return run_search(settings, run_process, deadline), processes


def true_limit(base, per_token, budget):
    return (budget - base) / per_token


@pytest.mark.parametrize(
    "base_gib,per_token,budget_gib",
    [(6.0, 252 * 1024, 16), (5.5, 581 * 1024, 32), (7.0, 2 * 2**20, 8), (5.0, 100 * 1024, 80)],
)
def test_linear_memory_converges_to_one_percent_around_the_true_limit(base_gib, per_token, budget_gib):
    budget = int(budget_gib * GIB)
    settings = SearchSettings(budget_bytes=budget, start=1024, max_length=4 << 20)
    state, processes = drive(settings, memory_model(base_gib * GIB, per_token)(budget))
    result = state.result()
    limit = true_limit(base_gib * GIB, per_token, budget)
    assert result["converged"] and not result["stopped"]
    lo, hi = result["longest_ok"], result["shortest_failed"]
    assert lo <= limit < hi
    assert hi <= lo * 1.01 or hi - lo <= settings.multiple
    assert result["probes"] <= 9  # the peak-memory line finds it faster than bisection from 1k would
    for ran in processes:  # a failure always ends its process
        assert all(p.outcome == OK for p in ran[:-1])


def test_quadratic_memory_still_converges_by_bisection():
    budget = 32 * GIB
    settings = SearchSettings(budget_bytes=budget, start=1024, max_probes=30)
    probe = memory_model(6 * GIB, 100 * 1024, quadratic=200.0)(budget)
    state, _ = drive(settings, probe)
    lo, hi = state.lo, state.hi
    assert state.converged
    assert probe(lo).outcome == OK and probe(hi).outcome == OOM and hi <= lo * 1.01


def test_first_probe_failing_walks_down():
    budget = 8 * GIB
    settings = SearchSettings(budget_bytes=budget, start=1024, multiple=64)
    state, _ = drive(settings, memory_model(7.9 * GIB, 2 * 2**20)(budget))
    limit = true_limit(7.9 * GIB, 2 * 2**20, budget)  # ~51 tokens: below one multiple
    assert limit < 64
    assert state.lo == 0 and state.hi == 64 and state.converged


def test_non_oom_error_stops_the_search_and_says_so():
    def probe(length):
        if length > 3000:
            return Probe(length, ERROR, None, 0.1, "RuntimeError: index overflow")
        return Probe(length, OK, 1000 + length, 0.1)

    settings = SearchSettings(budget_bytes=10**12, start=1024)
    state, _ = drive(settings, probe)
    result = state.result()
    assert result["stopped"].startswith("a step at") and "not out-of-memory" in result["stopped"]
    assert result["failure"] == "RuntimeError: index overflow"
    assert result["longest_ok"] == 2048 and not result["converged"]


def test_max_length_caps_the_search():
    settings = SearchSettings(budget_bytes=80 * GIB, start=1024, max_length=8192)
    state, _ = drive(settings, memory_model(GIB, 1000)(80 * GIB))
    assert state.lo == 8192 and state.hi is None and state.converged
    assert max(p.length for p in state.probes) == 8192


def test_probe_limit_and_deadline_stop_with_the_bracket_so_far():
    budget = 32 * GIB
    probe = memory_model(6 * GIB, 100 * 1024, quadratic=200.0)(budget)
    state, _ = drive(SearchSettings(budget_bytes=budget, max_probes=3), probe)
    assert len(state.probes) == 3 and "probe limit" in state.stopped and not state.converged
    state, processes = drive(SearchSettings(budget_bytes=budget), probe, deadline=time.time() - 1)
    assert state.probes == [] and "time limit" in state.stopped and processes == []


def test_a_process_reuses_itself_only_near_its_loaded_length():
    settings = SearchSettings(budget_bytes=GIB, start=1000, multiple=1, reuse_factor=1.1)
    state = SearchState(settings, [Probe(1000, OK, 500_000_000), Probe(2000, OK, 510_000_000)])
    calls = []

    def probe(length):
        calls.append(length)
        return Probe(length, OK, 500_000_000 + length * 10)

    ran = list(probe_batch(state, probe, loaded_length=2000))
    # The prediction jumps 8x beyond 2000: a process loaded for 2000 must not try it.
    assert ran == [] and calls == []
    next_length = state.propose()
    assert next_length == 16000
    ran = list(probe_batch(state, probe, loaded_length=next_length))
    assert [p.length for p in ran][0] == 16000 and all(p.length <= 17600 for p in ran)


def test_timeout_probe_stops_and_the_same_length_is_never_probed_twice():
    state = SearchState(SearchSettings(budget_bytes=GIB))
    state.add(Probe(1024, OK, 100))
    state.add(Probe(2048, TIMEOUT, message="killed"))
    assert state.done and "ran out of time" in state.stopped and state.propose() is None
    with pytest.raises(ValueError, match="twice"):
        state.add(Probe(1024, OK, 100))


def test_probe_round_trips_through_json_dicts():
    p = Probe(4096, OOM, None, 1.5, "CUDA out of memory")
    assert Probe.from_dict(dict(p.__dict__, event="probe")) == p
