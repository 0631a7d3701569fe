"""Deprecated: gptlab 0.1's home of these building blocks; they live in :mod:`gptlab.nn`."""

from gptlab._compat import moved

__getattr__ = moved(__name__, {name: "gptlab.nn" for name in (
    "LayerKV", "SingleHeadAttention", "MultiHeadAttention", "LayerNorm", "MLP", "PreNormBlock",
    "PostNormBlock")})
