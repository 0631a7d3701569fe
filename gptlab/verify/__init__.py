"""Verification tools for the native kernels, kept apart from the runtime they check.

- ``emu/``: the C++ CUDA emulator, against which the ``cuda-emu``, ``cuda-emu-racecheck`` and
  ``cuda-emu-numerics`` flavours compile the plugin's ``.cu`` files (found by path, see
  ``gptlab.plugins.cuda_kernels.build``);
- ``emulator.py``: the emulator's schedule, the removal of one barrier or atomic, injected and
  asynchronous faults, set from Python, and its model of the machine (fake GPUs, contexts,
  capture: ``Machine``);
- ``emulated.py``: the emulated twins of the CUDA attention backends and layer kernels (``*-emu``:
  the ``.cu`` kernels on CPU tensors);
- ``mutations.py``: every barrier and atomic of the ``.cu`` files removed in turn, and what
  catches it;
- ``gpucheck/``: the one-command check of the CUDA kernels on a GPU machine (or, ``--emulate``,
  its rehearsal on the emulator) and its markdown report;
- ``commands.py``: ``gpt kernels check / mutations / gpucheck``, which the plugin's ``gpt
  kernels`` group offers beside ``build`` and ``info``.

The runtime (``gptlab.plugins.cuda_kernels``) imports nothing from here.
"""
