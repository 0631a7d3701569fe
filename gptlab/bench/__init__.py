"""Benchmarks, each as ratios to a baseline measured in the same run (``gpt bench``).

``attention.py``: attention backends vs sdpa (forward+backward time, peak memory);
``train.py``: whole training steps in variants (dtype, compile, backend, kernels; a peer model).
"""
