"""The host-side glue of the CUDA kernels (csrc/cuda/runtime.cu: launch checks, the device count,
the device guard) on the emulator's model of the machine: what an emulator that raised every
fault at once, had one device and no contexts could not show, shown as a GPU would show it.

- A fault inside a kernel surfaces at a later call on a GPU; $GPTLAB_CUDA_SYNC=1 makes its own op
  report it (but never synchronises a stream being captured into a graph).
- The library counts only GPUs it can run: compute capability 8.0 or newer, and SASS for the
  architecture or PTX the driver can compile (not PTX from a newer CUDA than the driver's).
- The device guard runs the kernels on the tensors' GPU and restores the caller's device without
  creating a context on it (as torch's guards do).
"""

import pytest
import torch

from gptlab.plugins.cuda_kernels import loader, ops
from gptlab.plugins.cuda_kernels.loader import SYNC_ENV, KernelError
from gptlab.verify import emulator

FLAVOUR = "cuda-emu"


@pytest.fixture
def machine():
    """The emulated library's machine, back to one 9.0 GPU with no context after the test (a
    sticky error left behind would fail every later emulated launch in this process)."""
    m = emulator.Machine(FLAVOUR)
    m.configure()
    yield m
    m.configure()


def rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 40, generator=g), torch.randn(40, generator=g), torch.randn(40,
                                                                                   generator=g)


def layer_norm(x, w, b):
    return ops.layer_norm(x, w, b, 1e-5, FLAVOUR)[0]


def assert_layer_norm(y, x, w, b):
    want = torch.nn.functional.layer_norm(x.double(), (x.shape[-1],), w.double(), b.double())
    assert (y.double() - want).abs().max() < 1e-4


# ------------------------------------------------------------------ faults name their op
def test_a_fault_is_reported_by_its_own_op_only_under_GPTLAB_CUDA_SYNC(machine, monkeypatch):
    x, w, b = rows()
    monkeypatch.delenv(SYNC_ENV, raising=False)
    with emulator.asynchronous():
        with emulator.fault("layernorm_forward_kernel"):
            layer_norm(x, w, b)  # as on a GPU: the launch succeeds, the fault comes later
        with pytest.raises(KernelError) as e:
            ops.bias_gelu(x, b, FLAVOUR)  # the next op is the one that raises
        assert machine.synchronize() == 700  # cudaErrorIllegalAddress, sticky
        with pytest.raises(KernelError) as later:
            ops.bias_gelu(x, b, FLAVOUR)  # and every op after it
    assert "bias_gelu_forward: kernel layernorm_forward_kernel, block (0, 0, 0): an illegal " \
           "memory access was encountered" in str(e.value)
    assert str(e.value).endswith("(a fault inside a kernel, this op's or an earlier one's: "
                                 "launches are asynchronous; rerun with GPTLAB_CUDA_SYNC=1 to "
                                 "find which)")
    assert str(later.value).endswith("(pending before this op began: an earlier kernel "
                                     "faulted; rerun with GPTLAB_CUDA_SYNC=1 to find which)")
    machine.configure()
    monkeypatch.setenv(SYNC_ENV, "1")
    with emulator.asynchronous(), emulator.fault("layernorm_forward_kernel"):
        with pytest.raises(KernelError) as e:
            layer_norm(x, w, b)
    assert str(e.value).startswith(
        "gptlab_layernorm_forward_f32 failed (code 3): layernorm_forward: kernel "
        "layernorm_forward_kernel, block (0, 0, 0): an illegal memory access was encountered")
    assert str(e.value).endswith("(in this op's kernels: GPTLAB_CUDA_SYNC=1 synchronised after "
                                 "its launch)")


def test_GPTLAB_CUDA_SYNC_never_synchronises_a_stream_being_captured(machine, monkeypatch):
    """Synchronising inside a CUDA-graph capture is not permitted (and invalidates it): under
    capture the check only looks at launch errors. (The ops pass stream 0 for CPU tensors.)"""
    x, w, b = rows()
    monkeypatch.setenv(SYNC_ENV, "1")
    machine.capture(0)
    assert_layer_norm(layer_norm(x, w, b), x, w, b)
    machine.capture(0, on=False)
    assert_layer_norm(layer_norm(x, w, b), x, w, b)  # synchronised again, and fine


# ------------------------------------------------------------------ which GPUs are usable
@pytest.mark.parametrize("devices, runtime, driver, count, why", [
    (("9.0",), "13.0", "13.0", 1, None),
    (("8.6",), "13.0", "13.0", 1, None),  # sm_80 SASS runs on 8.x
    (("10.0",), "13.0", "13.0", 1, None),  # compute_90 PTX, compiled by a driver as new as nvcc
    (("10.0",), "13.1", "13.1", 1, None),
    (("7.5", "9.0"), "13.0", "13.0", 1, None),
    (("10.0",), "13.1", "13.0", 0,
     "1 GPU(s) found, none usable: GPU 0 (compute capability 10.0) has no SASS in this library "
     "(sm_80, sm_90) and its compute_90 PTX needs a driver for CUDA 13.1 or newer to compile "
     "it, but the driver supports CUDA 13.0: set NVCC to an nvcc that knows sm_100, or update "
     "the driver"),
    (("7.5",), "13.0", "13.0", 0,
     "1 GPU(s) found, none usable: GPU 0 has compute capability 7.5; the kernels need 8.0 or "
     "newer (cp.async, ldmatrix, bfloat16 mma)"),
    (("9.0",), "13.0", "12.4", 0, "CUDA driver version is insufficient for CUDA runtime "
                                  "version"),
], ids=["9.0", "8.6", "10.0-ptx", "10.0-ptx-13.1", "7.5-and-9.0", "10.0-ptx-driver-older",
        "7.5", "driver-major-older"])
def test_the_library_counts_only_the_gpus_it_can_run_on(machine, devices, runtime, driver,
                                                        count, why):
    """The library carries SASS for sm_80 and sm_90 and compute_90 PTX here (a cuda build with no
    GPU to build for). Before, it counted every GPU of compute capability >= 8.0: nvcc 13.1 with
    a 13.0 driver failed every launch on a newer GPU at first call."""
    machine.configure(devices, runtime=runtime, driver=driver)
    assert loader.load(FLAVOUR).cuda_device_count() == (count, why)


def test_an_op_on_a_gpu_that_cannot_run_it_is_refused_before_any_launch(machine):
    machine.configure(("9.0", "10.0"), runtime="13.1", driver="13.0")
    machine.place(None, 1)  # every tensor lives on GPU 1
    x, w, b = rows()
    with pytest.raises(KernelError, match=r"layernorm_forward: GPU 1 \(compute capability 10.0\) "
                                          r"has no SASS in this library"):
        layer_norm(x, w, b)
    assert machine.last_launch_device() == -1 and not machine.has_context(1)
    machine.place(None, 0)
    assert_layer_norm(layer_norm(x, w, b), x, w, b)


# ------------------------------------------------------------------ the device guard
def test_the_device_guard_restores_without_creating_a_context(machine):
    """A run on cuda:1 from a thread where nothing made GPU 0's context: the kernels run on GPU
    1, and restoring the caller's device must not make GPU 0's context (a few hundred MB on a
    real GPU); a caller whose device has a context gets it back."""
    machine.configure(("9.0", "9.0"))
    machine.place(None, 1)
    x, w, b = rows()
    assert machine.current_device() == 0 and not machine.has_context(0)
    assert_layer_norm(layer_norm(x, w, b), x, w, b)
    assert machine.last_launch_device() == 1 and machine.has_context(1)
    assert not machine.has_context(0)
    assert machine.current_device() == 1  # left as torch's guard leaves it (c10 MaybeSetDevice)
    machine.set_device(0)  # now GPU 0 has a context: the guard restores it
    assert_layer_norm(layer_norm(x, w, b), x, w, b)
    assert machine.last_launch_device() == 1 and machine.current_device() == 0


def test_cuda_calls_run_under_torchs_own_device_guard(monkeypatch):
    """On CUDA the ops call the library inside torch.cuda.device(the tensors' GPU): torch then
    switches and restores its current device its own way (it never creates a context to restore
    one), and the library's guard finds the right device current. (A stand-in guard: no GPU.)"""
    events = []

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            events.append(("enter", self.index))

        def __exit__(self, *exc):
            events.append(("exit", self.index))

    class Library:
        ffi = "the library's ffi"

        def call(self, name, *args):
            events.append(("call", name))
            return 0

    monkeypatch.setattr(torch.cuda, "device", Guard)
    lib = ops._OnDevice(Library(), 1)
    assert lib.call("gptlab_layernorm_forward_f32", 1, 2) == 0
    assert events == [("enter", 1), ("call", "gptlab_layernorm_forward_f32"), ("exit", 1)]
    assert lib.ffi == "the library's ffi"
