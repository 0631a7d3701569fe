"""``auto`` measured: the fastest backend that runs wins (by a margin), the choice is cached,
a resumed run keeps its backend, and ``GPTLAB_AUTO=priority`` turns measuring off."""

import json

import pytest
import torch

from gptlab.core import autotune
from gptlab.core.attention import AttentionRequest
from gptlab.core.planning import plan_run
from gptlab.core.config import resolve_configs
from gptlab.core.selection import select

REQUEST = AttentionRequest(device="cpu", head_dim=8, q_len=16, k_len=16)
WORK = autotune.Workload(batch=2, heads=2)


class Fake:
    @classmethod
    def measure_tag(cls, request):
        return ""


class Slow(Fake):
    name, priority = "slow", 60


class Fast(Fake):
    name, priority = "fast", 10


class Broken(Fake):
    name, priority = "broken", 90


def fake_timer(seconds):
    def timer(cls):
        if seconds[cls] is None:
            raise RuntimeError("kernel exploded")
        return lambda: seconds[cls]
    return timer


def test_the_fastest_wins_by_a_margin_else_the_priority_stays():
    choice, medians = autotune.fastest([Slow, Fast], REQUEST, WORK,
                                       timer=fake_timer({Slow: 2.0, Fast: 1.0}))
    assert choice is Fast and medians == {"slow": 2.0, "fast": 1.0}
    choice, _ = autotune.fastest([Slow, Fast], REQUEST, WORK,
                                 timer=fake_timer({Slow: 1.0, Fast: 0.98}))
    assert choice is Slow  # 2% is noise: the higher priority keeps it


def test_a_candidate_that_raises_is_left_out():
    choice, medians = autotune.fastest([Broken, Slow, Fast], REQUEST, WORK,
                                       timer=fake_timer({Broken: None, Slow: 3.0, Fast: 1.0}))
    assert choice is Fast and "broken" not in medians


def test_a_candidate_failing_mid_measurement_is_left_out_and_nothing_is_cached(
        tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / autotune.CACHE_FILE)
    calls = {Slow: 0}

    def timer(cls):
        def run():
            if cls is Slow:
                calls[Slow] += 1
                if calls[Slow] > 2:  # warm-up and round 1 pass, then it runs out of memory
                    raise RuntimeError("out of memory")
            return 1.0 if cls is Fast else 2.0
        return run

    choice, medians = autotune.fastest([Slow, Fast], REQUEST, WORK, timer=timer)
    assert choice is Fast and list(medians) == ["fast"]
    monkeypatch.setattr(autotune, "fastest", lambda c, r, w: (Fast, {"fast": 1.0}))
    assert autotune.measured_choice([Slow, Fast], REQUEST, WORK) is Fast
    assert not (tmp_path / autotune.CACHE_FILE).exists()  # measured again next time


def test_long_sequences_are_measured_on_a_smaller_batch():
    long = AttentionRequest(device="cpu", head_dim=64, q_len=4096, k_len=4096)
    assert autotune.measured_batch(autotune.Workload(batch=16, heads=12), long) == 1
    assert autotune.measured_batch(autotune.Workload(batch=32, heads=6), AttentionRequest(
        q_len=128, k_len=128)) == 32  # the default preset: measured as it runs


def test_real_timing_runs_forward_and_backward_as_the_model_calls(registry):
    cls = registry.attention_backends["naive"]
    once = autotune.time_backend(cls, REQUEST, WORK)
    assert once() > 0 and once() > 0


def test_the_measurement_is_cached_per_machine_and_request(tmp_path, monkeypatch, registry):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / autotune.CACHE_FILE)
    calls = []

    def fake_fastest(candidates, request, work):
        calls.append(request)
        return candidates[-1], {c.name: 1.0 for c in candidates}

    monkeypatch.setattr(autotune, "fastest", fake_fastest)
    naive, sdpa = registry.attention_backends["naive"], registry.attention_backends["sdpa"]
    assert autotune.measured_choice([sdpa, naive], REQUEST, WORK) is naive
    assert autotune.measured_choice([sdpa, naive], REQUEST, WORK) is naive
    assert len(calls) == 1  # the second answer came from the cache
    table = json.loads((tmp_path / autotune.CACHE_FILE).read_text())
    (entry,) = table.values()
    assert entry["choice"] == "naive"
    autotune.measured_choice([sdpa, naive], AttentionRequest(device="cpu", head_dim=16), WORK)
    assert len(calls) == 2  # another request is measured anew
    (tmp_path / autotune.CACHE_FILE).write_text("{not json")  # a damaged cache is re-measured
    assert autotune.measured_choice([sdpa, naive], REQUEST, WORK) is naive
    assert len(calls) == 3


def test_plan_run_measures_auto_unless_told_not_to(tmp_path, monkeypatch, registry):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / autotune.CACHE_FILE)
    monkeypatch.setattr(autotune, "fastest",
                        lambda candidates, request, work: (
                            next(c for c in candidates if c.name == "sdpa"), {}))
    mc, tc = resolve_configs("tiny", {}, {})
    monkeypatch.delenv("GPTLAB_AUTO", raising=False)
    assert plan_run(registry, mc, tc).attention_name == "sdpa"  # measured
    assert plan_run(registry, mc, tc, prefer_attention="naive").attention_name == "naive"
    monkeypatch.setenv("GPTLAB_AUTO", "priority")
    highest = select(registry, "attention_backends", "auto", REQUEST).name
    assert highest != "sdpa"
    assert plan_run(registry, mc, tc).attention_name == highest


def test_a_named_backend_is_never_measured(monkeypatch, registry):
    monkeypatch.delenv("GPTLAB_AUTO", raising=False)
    monkeypatch.setattr(autotune, "fastest", lambda *a: pytest.fail("measured a named backend"))
    mc, tc = resolve_configs("tiny", {"attention": "naive"}, {})
    assert plan_run(registry, mc, tc).attention_name == "naive"


def test_measured_choice_on_this_machine_is_one_that_runs(tmp_path, monkeypatch, registry):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / autotune.CACHE_FILE)
    monkeypatch.delenv("GPTLAB_AUTO", raising=False)
    backend = select(registry, "attention_backends", "auto", REQUEST,
                     measure=lambda ready: autotune.measured_choice(ready, REQUEST, WORK))()
    q = torch.randn(2, 2, 16, 8)
    torch.testing.assert_close(backend(q, q, q, causal=True),
                               registry.attention_backends["naive"]()(q, q, q, causal=True))
    (entry,) = json.loads((tmp_path / autotune.CACHE_FILE).read_text()).values()
    assert entry["choice"] == backend.name and set(entry["ms"]) >= {"naive", "sdpa"}
