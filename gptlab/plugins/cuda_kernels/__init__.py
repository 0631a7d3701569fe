"""Native attention kernels (C for the CPU, CUDA for GPUs), loaded with cffi.

This plugin package is the home of the ``fused`` (fused scale + mask + softmax) and ``flash``
(FlashAttention: Dao et al. 2022; Dao 2023) backends. It registers nothing yet: the kernels are
built in the next issues.
"""
