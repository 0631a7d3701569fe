"""Will a training run fit in memory? A pre-flight estimate, so that a run too large for the
machine is a one-line error before anything is allocated, not a crash (or the kernel's OOM
killer) minutes later.

The estimate is deliberately simple and on the generous side: weights, gradients and AdamW's two
moments (4 copies of the parameters, float32), plus the activations autograd keeps for one
step, per token: ``n_layer * (20 * n_embd + 3 * n_head * block_size)`` floats (the residual
stream, LayerNorms, q/k/v, the 4x MLP, and the T x T attention weights of the naive backend;
Korthikanti et al. 2022 count ~34 half-precision values per token and width) plus
``4 * vocab_size`` for the logits and their gradients.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import OutOfMemory

GIB = 2**30


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can get on ``device`` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def training_bytes(n_params: int, mc: ModelConfig, tc: TrainConfig) -> tuple[int, int]:
    """(state bytes, activation bytes) of one training step, as estimated above."""
    state = 4 * 4 * n_params
    per_token = mc.n_layer * (20 * mc.n_embd + 3 * mc.n_head * mc.block_size) + 4 * mc.vocab_size
    return state, 4 * tc.batch_size * mc.block_size * per_token


def count_parameters(build) -> int | None:
    """Parameters of the model ``build()`` constructs, built on the meta device (no memory,
    no random numbers drawn); None if the model cannot be built there."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # a plugin model that cannot be built on meta: no estimate
        return None
    return sum(p.numel() for p in model.parameters())


def check_fits(build, mc: ModelConfig, tc: TrainConfig, device: torch.device) -> None:
    """A one-line :class:`OutOfMemory` if training the model ``build()`` constructs (counted on
    the meta device) with ``tc``'s batch cannot fit in ``device``'s available memory; nothing
    where either cannot be told. Every caller that allocates a run's model checks this first."""
    n = count_parameters(build)
    have = available_bytes(device)
    if n is None or have is None:
        return
    state, acts = training_bytes(n, mc, tc)
    if device.type == "cpu":  # the processes of this host share its memory
        replicas = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        state, acts = state * replicas, acts * replicas
    if state + acts > have:
        raise OutOfMemory(
            f"this run needs about {(state + acts) / GIB:.1f} GiB ({n / 1e6:,.1f}M parameters "
            f"with gradients and AdamW state: {state / GIB:.1f} GiB; activations of "
            f"{tc.batch_size} x {mc.block_size} tokens: {acts / GIB:.1f} GiB) but "
            f"{device.type} has {have / GIB:.1f} GiB available; lower --batch-size, "
            f"--block-size, --n-embd or --n-layer")
