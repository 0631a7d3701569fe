"""Deprecated: gptlab 0.1's training module, split into :mod:`gptlab.core.trainer`,
:mod:`gptlab.core.evaluation`, :mod:`gptlab.core.generation`, :mod:`gptlab.core.runs` and
:mod:`gptlab.data.batches`."""

from gptlab._compat import moved

__getattr__ = moved(__name__, {
    **dict.fromkeys(("train", "Trainer", "TrainEvent", "TrainResult", "TrainingInterrupted",
                     "lr_at", "make_optimizer"), "gptlab.core.trainer"),
    **dict.fromkeys(("estimate_loss", "evaluate_split"), "gptlab.core.evaluation"),
    **dict.fromkeys(("encode_splits", "get_batch", "Splits"), "gptlab.data.batches"),
    "sample_text": "gptlab.core.generation", "MetricsLog": "gptlab.core.runs"})
