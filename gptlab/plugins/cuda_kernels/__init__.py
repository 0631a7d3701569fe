"""Native attention kernels, C for the CPU and CUDA for GPUs, loaded with cffi: the runtime.

Registers the ``fused`` (fused scale + mask + softmax) and ``flash`` (FlashAttention: Dao et al.
2022; Dao 2023) attention backends, the ``native`` layer kernels (LayerNorm, bias + GELU,
cross-entropy) and the ``gpt kernels`` command group. Layout:

- ``csrc/gptlab_kernels.h``: the one C ABI (also the cffi cdef), read by ``abi.py``;
- ``csrc/cpu/``: the C kernels (``softmax.c``, ``flash.c``, the row-wise kernels, ``decode.c``);
  ``csrc/cuda/``: their CUDA twins (``softmax.cu``, ``flash.cu``, ...) and flash attention on
  tensor cores (``flash_tc.cu``, bfloat16 and float16, the ``flash-tc`` backend);
- ``build.py``: cached, locked compilation of the ``cpu``, ``cuda``, ``cuda-emu`` and
  ``cuda-emu-racecheck`` flavours (the emulated two against the CUDA emulator of
  ``gptlab/verify/emu/``, by path); ``loader.py``: cffi; ``ops.py``: torch custom ops with
  autograd; ``backends.py``: the attention backends; ``layer_kernels.py``: the layer kernels;
  ``decode.py``: the fused decoding step; ``commands.py``: ``gpt kernels build / info``.

The tools that verify these kernels (the emulator, the emulated backends, mutation testing,
``gpt kernels check / mutations / gpucheck``) live apart in :mod:`gptlab.verify`, which this
package never imports (but for adding its commands to the ``gpt kernels`` group). Each kernel
source file names, in its header comment, the reference it is checked against, the command that
checks it and the one that benchmarks it.
"""

from gptlab import hookimpl


@hookimpl
def register_attention_backends():
    from gptlab.plugins.cuda_kernels import ops  # noqa: F401  (registers torch.ops.gptlab.*)
    from gptlab.plugins.cuda_kernels.backends import (FlashAttention, FusedAttention,
                                                      TensorCoreFlash)

    return [FusedAttention, FlashAttention, TensorCoreFlash]


@hookimpl
def register_layer_kernels():
    from gptlab.plugins.cuda_kernels.layer_kernels import NativeKernels

    return [NativeKernels]


@hookimpl
def register_decoders():
    from gptlab.plugins.cuda_kernels.decode import FusedDecoder

    return [FusedDecoder]


@hookimpl
def register_commands(cli):
    from gptlab.plugins.cuda_kernels.commands import kernels

    cli.add_command(kernels)
