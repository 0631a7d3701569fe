"""Verification tools for the native kernels, kept apart from the runtime they check.

- ``emu/``: the C++ CUDA emulator, against which the ``cuda-emu`` and ``cuda-emu-racecheck``
  flavours compile the plugin's ``.cu`` files (found by path, see
  ``gptlab.plugins.cuda_kernels.build``).

The runtime (``gptlab.plugins.cuda_kernels``) imports nothing from here.
"""
