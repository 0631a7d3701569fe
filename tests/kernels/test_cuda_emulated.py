"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU by the emulator: conformance under four
schedules (every default case under inorder and random, a subset under reverse and greedy) and
with a GPU's numerics, odd head dims, a removed barrier that must fail, no race found by the race
detector, typed errors."""

import pytest
import torch

from gptlab.core.attention import AttentionRequest
from gptlab.plugins.cuda_kernels import backends, build
from gptlab.testing import Case, default_cases, run_conformance
from gptlab.verify import emulated, emulator, mutations

SCHEDULES = ("inorder", "random:1")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cls", [emulated.EmulatedFused, emulated.EmulatedFlash],
                         ids=lambda c: c.name)
def test_conformance_on_emulated_cuda_kernels(cls, schedule):
    """Forward and backward of the .cu kernels, every default case (T <= 255), per schedule."""
    cases = default_cases(cls)
    assert len(cases) >= 140 and max(c.tk for c in cases) <= 256
    with emulator.schedule(schedule):
        results = run_conformance(cls(), cases=cases)  # raises, listing every failed case
    assert len(results) == len(cases)


@pytest.mark.parametrize("cls", [emulated.EmulatedFused, emulated.EmulatedFlash],
                         ids=lambda c: c.name)
def test_conformance_with_a_gpus_numerics(cls):
    """Every default case again on flavour cuda-emu-numerics: FMA contraction (flash.cu's row
    max against P, the mismatch its double / hi-lo logsumexp removes), exp2f off by up to 2 ulp,
    subnormals flushed by atomicAdd (dQ): the same tolerances hold."""
    twin = emulated.on_flavour(cls, build.CUDA_EMU_NUMERICS.name)
    cases = default_cases(twin)
    assert len(run_conformance(twin(), cases=cases)) == len(cases) >= 140


@pytest.mark.parametrize("schedule", ("reverse", "greedy"))
def test_flash_conformance_under_reverse_and_greedy_schedules(schedule):
    """The other two schedules on a subset (every case under four schedules would take the
    emulated suites over their time budget): one and several tiles, partial tiles, the smallest
    and an odd head dim, and the special cases (q_scale 20, fewer and more queries than keys).
    Flash only: softmax.cu has no shared memory and no barrier, so no schedule changes it."""
    cases = default_cases(emulated.EmulatedFlash, seq_lens=(1, 7, 65, 97), head_dims=(8, 80))
    with emulator.schedule(schedule):
        assert len(run_conformance(emulated.EmulatedFlash(), cases=cases)) == len(cases) > 30


@pytest.mark.parametrize("cls", [emulated.EmulatedFused, emulated.EmulatedFlash],
                         ids=lambda c: c.name)
def test_emulated_cuda_kernels_at_odd_and_edge_head_dims(cls):
    """Odd head dims (the shared-memory stride is then d itself), and d = 128, whose backward
    uses 43.4 KB of shared memory: under the 48 KB launch limit the emulator enforces."""
    cases = [Case(1, 2, 33, 33, hs, causal) for hs in (1, 7, 33, 127, 128)
             for causal in (True, False)]
    with emulator.schedule("random:3"):
        run_conformance(cls(), cases=cases)


def kv_tile_barrier() -> str:
    """flash.cu's __syncthreads between staging a K/V tile and reading it, as FILE:LINE."""
    (site,) = [s for s in mutations.find_sites()
               if s.file == "flash.cu" and "the K, V tile is complete" in s.code]
    return str(site)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_removed_syncthreads_fails_the_suite(schedule):
    """The barrier between staging K/V and reading it, removed ($GPTLAB_EMU_MUTATE): every case
    fails. (tests/kernels/test_mutations.py removes every barrier and atomic in turn.)"""
    cases = [Case(1, 1, 7, 7, 8, True), Case(2, 3, 65, 65, 32, True),
             Case(1, 2, 97, 97, 80, False)]
    with emulator.schedule(schedule), emulator.mutate(kv_tile_barrier()), \
            pytest.raises(AssertionError, match="3/3 cases failed"):
        run_conformance(emulated.EmulatedFlash(), cases=cases)


def test_racecheck_finds_no_race_in_the_kernels():
    """The race detector (flavour cuda-emu-racecheck) on the correct kernels, blocks interleaved:
    partial and whole tiles, head dims 8 to 128, fewer and more queries than keys, several
    heads; and the row-wise kernels (more than one chunk and column strip)."""
    from test_rowwise_kernels import (_assert_within, check_bias_gelu, check_cross_entropy,
                                      check_layer_norm)

    racecheck = build.CUDA_EMU_RACECHECK.name
    cases = [Case(1, 2, 65, 65, hs, causal) for hs in (8, 33, 128) for causal in (True, False)]
    cases += [Case(1, 2, 7, 97, 32, True), Case(1, 2, 9, 4, 32, False), Case(2, 3, 1, 65, 32, True)]
    with emulator.schedule("random:1"):
        for base in (emulated.EmulatedFlash, emulated.EmulatedFused):
            run_conformance(mutations.emulated_backend(base, racecheck), cases=cases)
        for rows, C in ((1, 3), (33, 65)):
            _assert_within("layer_norm", check_layer_norm(racecheck, rows, C), (rows, C))
            _assert_within("bias_gelu", check_bias_gelu(racecheck, rows, C), (rows, C))
            _assert_within("cross_entropy", check_cross_entropy(racecheck, rows, C), (rows, C))


def test_emulated_kernels_give_typed_errors():
    from gptlab.plugins.cuda_kernels import ops
    from gptlab.plugins.cuda_kernels.loader import KernelError

    q = torch.randn(1, 1, 4, 130)
    with pytest.raises(KernelError, match=r"gptlab_flash_forward_f32 failed \(code 1\): "
                                          r"flash_forward: head dim 130 > 128"):
        ops.flash_attn(q, q, q, 1.0, True, "cuda-emu")
    with pytest.raises(KernelError, match="cuda-emu kernels take float32, got float64"):
        ops.fused_softmax(torch.randn(2, 3, dtype=torch.float64), 1.0, False, "cuda-emu")
    assert emulated.EmulatedFlash.not_supported_reasons(
        AttentionRequest(device="cpu", head_dim=130)) == ["head_dim 130 outside [1, 128]"]
    assert "head_dim 200 > 128 not supported by the CUDA kernels" in " ".join(
        backends.FlashAttention.not_supported_reasons(AttentionRequest(device="cuda",
                                                                       head_dim=200)))
