"""Benchmarks, each as ratios to a baseline measured in the same run (``gpt bench``).

``attention.py``: attention backends vs sdpa (forward+backward time, peak memory);
``train.py``: whole training steps in variants (dtype, compile, backend, kernels; a peer model);
``generate.py``: greedy decoding with and without the KV cache; ``ops.py``: the layer kernels'
LayerNorm, linear + GELU and cross-entropy vs PyTorch; ``commands.py``: the ``gpt bench`` group.
"""
