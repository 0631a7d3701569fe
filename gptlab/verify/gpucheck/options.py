"""What a gpucheck run does: its sections, and the sizes of its checks and benchmark."""

from __future__ import annotations

import attrs

SECTIONS = ("environment", "conformance", "layouts", "streams", "graphs", "devices", "faults",
            "sanitizer", "benchmark")
#: ``--quick``: the conformance suite on these lengths and head dims only (35 cases, not 151).
QUICK_SEQ_LENS = (1, 7, 65)
QUICK_HEAD_DIMS = (16, 80)


@attrs.frozen
class Options:
    """The sections to run and the sizes of their cases: by default for an H100, and
    :meth:`emulated` for the emulator."""

    B: int = 8
    H: int = 12
    T: int = 2048
    head_dims: tuple[int, ...] = (64, 128)
    reps: int = 10
    warmup: int = 3
    rule_T: int = 2048  # the precision rule's long causal sequence
    sanitizer_timeout_s: float = 120.0
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False  # float32 conformance on QUICK_SEQ_LENS x QUICK_HEAD_DIMS only

    @classmethod
    def emulated(cls, **overrides) -> Options:
        """Small enough for the emulator (a fiber per CUDA thread): seconds, not hours."""
        return cls(**{"B": 1, "H": 2, "T": 64, "head_dims": (32,), "reps": 3, "warmup": 1,
                      "rule_T": 256, **overrides})
