"""``gpt kernels gpucheck``: check the CUDA kernels on a GPU machine, into one markdown report.

Made for a borrowed GPU (minutes, not hours): one command, under 10 minutes on an H100, that
leaves everything worth knowing in one file. Nine sections, each failing soft (an exception is
one line in its section and the next section runs), one module each, all but the benchmark with
``GPTLAB_CUDA_SYNC=1`` (a fault is reported by its own op):

- :mod:`.environment`: GPU, compute capability, driver, torch and its CUDA, nvcc, what the
  ``cuda`` flavour is built for here; builds it and shows ptxas' registers / spills / shared
  memory per kernel with the occupancy each implies on this GPU (:mod:`.occupancy`; threads per
  block from the PTX's ``.maxntid``, read with ``cuobjdump`` where it is installed);
- :mod:`.conformance`: every CUDA attention backend and CUDA layer kernel of the plugin (found in
  the registry, so a backend added later is checked without editing this package), per dtype it
  declares: float32 attention by :func:`gptlab.testing.run_conformance`, other dtypes by
  FlashAttention's precision rule (:func:`gptlab.testing.check_precision`) on a few shapes; the
  rule at a long causal sequence for every backend and dtype; the layer kernels by
  :func:`gptlab.testing.check_layer_kernels`;
- :mod:`.layouts`, :mod:`.streams`, :mod:`.graphs`, :mod:`.devices`: every kernel call
  (:mod:`.calls`) on storage-offset, odd-stride inputs; on a side stream with ``wait_stream``;
  captured into a CUDA graph (its first launch) and replayed; on cuda:1 while cuda:0 is current,
  making no context on GPU 0; each against a plain run (graphs and devices in a fresh process,
  :mod:`.probe`);
- :mod:`.faults`: a kernel made to read an illegal address is reported by its own op under
  ``GPTLAB_CUDA_SYNC=1``, and by a later call without it;
- :mod:`.sanitizer`: ``compute-sanitizer`` memcheck, racecheck and synccheck on a small-case run
  of every kernel (:mod:`.smoke`: ``python -m gptlab.verify.gpucheck.smoke``);
- :mod:`.benchmark`: forward and forward+backward of each backend and dtype against sdpa in the
  same dtype: median of timed runs after a warm-up (:mod:`.timing`: CUDA events), TFLOP/s and
  peak memory (``torch.cuda.max_memory_allocated``).

:mod:`.targets` says what is checked, :mod:`.options` at what sizes, :mod:`.report` renders the
sections, and :mod:`.check` runs them in order. The pure parts (FLOPs, occupancy, the PTX
parser, the timing harness, the section runner, the report) are plain functions tested on the
CPU. ``--emulate`` runs the whole command on the CPU with the emulated kernels (the ``.cu`` files
run by the CUDA emulator, :func:`.targets.emulated_target`): a rehearsal of the command, not a
measurement of a GPU.
"""
