"""What makes a training step fast, each checked for what it must not change: ``--dtype auto``
(its choice on machines with and without bfloat16, mocked; kept on resume), the fused AdamW
(old for-loop states resume on the for-loop, bit-exactly) and the q, k, v gradients written as
one projection's gradient (the same values, no copy)."""

import attrs
import pytest
import torch

from gptlab.core import autotune, precision
from gptlab.core.checkpoint import load_checkpoint
from gptlab.core.config import ModelConfig, TrainConfig, resolve_configs
from gptlab.core.optimizers import AdamWRecipe
from gptlab.core.planning import build_model, plan_run
from gptlab.core.trainer import Trainer

TEXT = ("Prince Vasili always spoke languidly, like an actor repeating a stale part. "
        "Anna Pavlovna Scherer on the contrary overflowed with animation. ") * 30


# ------------------------------------------------------------------ --dtype auto
@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """``auto`` measures (not GPTLAB_AUTO=priority), into a cache of this test's own; returns
    the list of measurements made."""
    monkeypatch.delenv("GPTLAB_AUTO", raising=False)
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / autotune.CACHE_FILE)
    made = []
    monkeypatch.setattr(autotune, "measured_choice", lambda ready, request, work: ready[0])
    return made


def tiny(**train):
    return resolve_configs("tiny", {"attention": "naive"}, train)


def test_auto_takes_bfloat16_where_it_is_measured_faster_and_remembers(registry, measuring,
                                                                        monkeypatch):
    monkeypatch.setattr(precision, "bfloat16_unavailable_reason", lambda device: None)

    def fake_timing(models, idx, device, rounds=precision.ROUNDS):
        measuring.append(sorted(models))
        assert idx.shape == (32, 64)  # the run's batch and block size
        return {"float32": 1.0, "bfloat16": 0.7}

    monkeypatch.setattr(precision, "time_passes", fake_timing)
    mc, tc = tiny()
    assert tc.dtype == "auto"  # gpt run's default
    plan = plan_run(registry, mc, tc)
    assert plan.train_config.dtype == "bfloat16" and plan.asked.dtype == "auto"
    assert plan.dtype_reason == "auto: bfloat16 1.43x float32 here"
    assert plan.attention.name == "naive" and measuring == [["bfloat16", "float32"]]
    assert plan_run(registry, mc, tc).train_config.dtype == "bfloat16"
    assert len(measuring) == 1  # remembered: measured once on this machine


def test_auto_measures_again_for_another_build_of_the_kernels(registry, measuring,
                                                              monkeypatch):
    """The measurement is remembered per build of the kernels the run would use: kernels
    changed since are timed again, not credited with the old build's speed."""
    from gptlab.plugins.cuda_kernels.layer_kernels import NativeKernels

    monkeypatch.setattr(precision, "bfloat16_unavailable_reason", lambda device: None)

    def fake_timing(models, idx, device, rounds=precision.ROUNDS):
        measuring.append(sorted(models))
        return {"float32": 1.0, "bfloat16": 0.7}

    monkeypatch.setattr(precision, "time_passes", fake_timing)
    mc, tc = tiny()
    assert plan_run(registry, mc, tc).kernels_name == "native"
    plan_run(registry, mc, tc)
    assert len(measuring) == 1
    monkeypatch.setattr(NativeKernels, "measure_tag",
                        classmethod(lambda cls, request: "@another-build"))
    plan_run(registry, mc, tc)
    assert len(measuring) == 2


def test_a_run_too_big_for_memory_is_refused_before_auto_builds_it_to_measure(
        registry, measuring, monkeypatch):
    """--dtype auto builds the model to time it: the memory pre-flight comes first."""
    from gptlab.core import memory
    from gptlab.core.errors import OutOfMemory

    monkeypatch.setattr(precision, "bfloat16_unavailable_reason", lambda device: None)
    monkeypatch.setattr(precision, "time_passes", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)  # 1 GiB free
    mc, tc = resolve_configs("tiny", {"attention": "naive", "n_layer": 12, "n_embd": 1024,
                                      "n_head": 8}, {})  # ~151M parameters: ~2.3 GiB of state
    with pytest.raises(OutOfMemory, match=r"^this run needs about .* but cpu has 1\.0 GiB "
                                          r"available; lower --batch-size"):
        plan_run(registry, mc, tc)


def test_auto_is_float32_without_measuring_where_bfloat16_cannot_pay(registry, measuring,
                                                                      monkeypatch):
    monkeypatch.setattr(precision, "time_passes", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(precision, "bfloat16_unavailable_reason",
                        lambda device: "this CPU has no bfloat16 instructions (AVX-512 BF16 or "
                                       "AMX)")
    mc, tc = tiny()
    plan = plan_run(registry, mc, tc)
    assert plan.train_config.dtype == "float32"
    assert plan.dtype_reason == ("auto: this CPU has no bfloat16 instructions (AVX-512 BF16 or "
                                 "AMX)")


def test_auto_keeps_float32_where_bfloat16_is_measured_slower(registry, measuring, monkeypatch):
    monkeypatch.setattr(precision, "bfloat16_unavailable_reason", lambda device: None)
    monkeypatch.setattr(precision, "time_passes",
                        lambda *a, **k: {"float32": 1.0, "bfloat16": 0.95})  # under the margin
    plan = plan_run(registry, *tiny())
    assert plan.train_config.dtype == "float32"
    assert plan.dtype_reason == "auto: bfloat16 1.05x float32 here"


def test_a_named_dtype_wins_and_priority_mode_measures_nothing(registry, measuring,
                                                               monkeypatch):
    monkeypatch.setattr(precision, "time_passes", lambda *a, **k: pytest.fail("measured"))
    plan = plan_run(registry, *tiny(dtype="float32"))
    assert plan.train_config.dtype == "float32" and plan.dtype_reason is None
    monkeypatch.setenv("GPTLAB_AUTO", "priority")
    plan = plan_run(registry, *tiny())
    assert plan.train_config.dtype == "float32"
    assert plan.dtype_reason == "auto: not measured (GPTLAB_AUTO=priority)"


def test_the_dtype_auto_chose_is_saved_and_kept_on_resume(registry, measuring, monkeypatch,
                                                          tmp_path):
    monkeypatch.setattr(precision, "bfloat16_unavailable_reason", lambda device: None)
    monkeypatch.setattr(precision, "time_passes",
                        lambda *a, **k: {"float32": 1.0, "bfloat16": 0.5})
    mc, tc = resolve_configs("tiny", {"attention": "naive", "block_size": 16},
                             {"max_iters": 2, "eval_iters": 1, "final_eval_iters": 1})
    trainer = Trainer(registry, mc, tc, TEXT, out_dir=tmp_path / "run")
    assert trainer.cfg.dtype == "bfloat16"
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.train_config.dtype == "bfloat16"
    monkeypatch.setattr(precision, "time_passes", lambda *a, **k: pytest.fail("measured"))
    resumed = Trainer(registry, ckpt.model_config, ckpt.train_config, TEXT, resume=ckpt)
    assert resumed.cfg.dtype == "bfloat16" and resumed.plan.dtype_reason is None


def test_bfloat16_unavailable_reason_on_this_machine_matches_its_flags():
    why = precision.bfloat16_unavailable_reason(torch.device("cpu"))
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (why is None) == native
    assert why is None or "no bfloat16 instructions" in why


def test_the_timed_check_times_both_dtypes_on_the_real_model(registry):
    mc, _ = tiny()
    mc = attrs.evolve(mc, vocab_size=20, block_size=8, n_layer=1)
    models = {d: build_model(registry, mc) for d in ("float32", "bfloat16")}
    seconds = precision.time_passes(models, torch.randint(0, 20, (2, 8)), torch.device("cpu"),
                                    rounds=2)
    assert set(seconds) == {"float32", "bfloat16"} and all(t > 0 for t in seconds.values())
    assert all(p.grad is None for m in models.values() for p in m.parameters())


# ------------------------------------------------------------------ fused AdamW
def losses(trainer, steps):
    return [trainer.step() for _ in range(steps)]


def test_new_runs_take_fused_adamw_and_old_states_resume_on_the_for_loop_bit_exactly(
        registry, tmp_path, monkeypatch):
    mc = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, attention="naive")
    tc = TrainConfig(max_iters=12, batch_size=4, eval_interval=6, eval_iters=1,
                     final_eval_iters=1, seed=3, warmup_iters=2, dtype="float32")
    assert all(g["fused"] for g in Trainer(registry, mc, tc, TEXT).optimizer.param_groups)
    # a run of the for-loop implementation (what gptlab wrote before fusing), saved at step 6
    monkeypatch.setattr(AdamWRecipe, "fused", False)
    old = Trainer(registry, mc, tc, TEXT, out_dir=tmp_path / "old")
    before = losses(old, 6)
    old.save()
    after = losses(old, 6)  # what the old run does next
    old.close()
    monkeypatch.setattr(AdamWRecipe, "fused", True)
    ckpt = load_checkpoint(tmp_path / "old")
    resumed = Trainer(registry, ckpt.model_config, ckpt.train_config, TEXT, resume=ckpt)
    assert not any(g["fused"] for g in resumed.optimizer.param_groups)
    assert losses(resumed, 6) == after and len(before) == 6  # bit-exact
    for p, q in zip(resumed.model.parameters(), old.model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ q, k, v gradients
def test_packed_gradients_are_the_split_gradients_without_a_copy(registry, monkeypatch):
    from gptlab.nn import attention as nn_attention
    from gptlab.plugins.cuda_kernels import ops

    mc = ModelConfig(vocab_size=30, block_size=32, n_layer=2, n_head=4, n_embd=64,
                     attention="flash", kernels="torch")
    torch.manual_seed(0)
    model = build_model(registry, mc)
    x = torch.randint(0, 30, (3, 32), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, x)[1].backward()
        return [p.grad.clone() for p in model.parameters()]

    seen = []
    real = nn_attention.SplitHeads.backward

    def spy(ctx, dq, dk, dv):
        out = real(ctx, dq, dk, dv)
        seen.append(out[0].data_ptr() == dq.data_ptr())  # the flash gradient itself
        return out

    monkeypatch.setattr(nn_attention.SplitHeads, "backward", staticmethod(spy))
    packed = grads()
    assert seen == [True, True]  # both layers: no copy
    monkeypatch.setattr(ops, "PACK_QKV_GRADIENTS", False)
    seen.clear()
    apart = grads()
    assert seen == [False, False]  # concatenated, as split's backward does
    assert all(torch.equal(a, b) for a, b in zip(packed, apart))
