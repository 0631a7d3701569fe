"""Optimisers as plugins: the :class:`OptimizerRecipe` interface and Muon.

A recipe builds a ``torch.optim.Optimizer`` for a model and a :class:`TrainConfig`
(``--optimizer NAME``). Its parameter groups may carry ``base_lr``: the trainer's schedule
(warmup, cosine) then sets each such group's learning rate to ``base_lr`` times the schedule's
factor, so an optimiser can run its own learning rate next to AdamW's (groups without it get the
schedule's ``--lr`` itself). The optimiser's state is saved in checkpoints and restored on
resume (``state_dict`` / ``load_state_dict``), so resuming stays bit-exact.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"): SGD with
Nesterov momentum whose update of each 2-D weight is replaced by the nearest semi-orthogonal
matrix, computed by a quintic Newton-Schulz iteration, and scaled by ``sqrt(max(1, rows /
cols))``. Only hidden matrices take it; the embeddings, the output head, norms and biases stay
with AdamW, as in the modded-nanogpt speedrun.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn


class OptimizerRecipe:
    """Builds the optimiser of a run: ``build(model, cfg) -> torch.optim.Optimizer``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @classmethod
    def build(cls, model: nn.Module, cfg) -> torch.optim.Optimizer:
        raise NotImplementedError


def adamw_groups(params: list[nn.Parameter], cfg) -> list[dict]:
    """nanoGPT's groups: weight decay on matrices (embeddings, Linear weights) only."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def adamw(groups: list[dict], cfg) -> torch.optim.AdamW:
    """torch's AdamW over ``groups``, fused (one kernel for every parameter's update instead of
    ~6 ops per parameter) where every parameter is a floating-point tensor on the CPU or a GPU;
    the for-loop implementation elsewhere. The choice is kept in the optimizer's state: a state
    saved by the for-loop implementation resumes on it, bit-exactly."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and AdamWRecipe.fused and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=fused or None)


class AdamWRecipe(OptimizerRecipe):
    name = "adamw"
    description = "AdamW (Loshchilov & Hutter 2019), decay on matrices only (nanoGPT), fused"
    #: False: the for-loop implementation everywhere (``gpt bench train`` measures the difference)
    fused: ClassVar[bool] = True

    @classmethod
    def build(cls, model, cfg):
        params = [p for p in model.parameters() if p.requires_grad]
        return adamw(adamw_groups(params, cfg), cfg)


#: The quintic's coefficients (Jordan et al. 2024): chosen to push every singular value in (0, 1]
#: towards 1 as fast as possible; they land in about [0.7, 1.2] after 5 steps, not exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with g's singular vectors: ``U V^T`` of
    ``g = U S V^T``, by ``steps`` iterations of ``X <- a X + (b A + c A^2) X``, ``A = X X^T``,
    starting from ``g / ||g||_F`` (so every singular value starts <= 1). ``g`` is one matrix
    ``(rows, cols)`` or a stack of them ``(n, rows, cols)``, each orthogonalised on its own (one
    batched product per stage instead of n small ones)."""
    a, b, c = NS_COEFFS
    x = g.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: A is the smaller Gram matrix
        x = x.mT
    fma = torch.addmm if x.dim() == 2 else torch.baddbmm  # beta * input + alpha * (m1 @ m2)
    for _ in range(steps):
        A = x @ x.mT
        x = fma(x, fma(A, A, A, beta=b, alpha=c), x, beta=a)  # a x + (b A + c A A) x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: ``buf = momentum * buf + grad``; the update direction
    ``grad + momentum * buf`` (Nesterov) is orthogonalised by :func:`newton_schulz` and applied
    as ``p -= lr * sqrt(max(1, rows / cols)) * O`` (with decoupled weight decay ``lr * wd * p``).
    Parameters of one shape in a group (the same matrix of every block) are orthogonalised
    together, as one stack.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape "
                                     f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                by_shape.setdefault((p.shape, p.dtype, p.device), []).append(
                    (p, p.grad.add(buf, alpha=mom)))
            for (shape, _, _), items in by_shape.items():
                ps, directions = zip(*items)
                updates = newton_schulz(torch.stack(directions), group["ns_steps"])
                scale = -lr * max(1.0, shape[0] / shape[1]) ** 0.5
                for p, update in zip(ps, updates):
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(update.to(p.dtype), alpha=scale)
        return loss


class CombinedOptimizer:
    """Several optimisers stepped as one (Muon for the hidden matrices, AdamW for the rest),
    with the interface the trainer, gradient clipping and ``torch.amp.GradScaler`` use: their
    parameter groups are this optimiser's groups, in order, so a schedule sets every group's
    ``lr``, and ``state_dict`` holds every part's state."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        # looked up each time: a part's load_state_dict replaces its group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self):
        return {"parts": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict):
        parts = state_dict.get("parts") if isinstance(state_dict, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError("this optimiser state is not a Muon + AdamW state of the same "
                             "layout (was the run trained with another --optimizer?)")
        for o, s in zip(self.optimizers, parts):
            o.load_state_dict(s)


def muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW): embeddings and the output head go
    to AdamW even though they are 2-D."""
    special = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        special.add(id(head.weight))
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.dim() == 2 and id(p) not in special]
    rest = [p for p in params if not (p.dim() == 2 and id(p) not in special)]
    return hidden, rest


class MuonRecipe(OptimizerRecipe):
    name = "muon"
    description = ("Muon (Jordan et al. 2024) for hidden matrices at --muon-lr, AdamW for "
                   "embeddings, head, norms and biases at --lr")

    @classmethod
    def build(cls, model, cfg):
        hidden, rest = muon_params(model)
        muon = Muon([{"params": hidden, "base_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                    momentum=cfg.muon_momentum)
        return CombinedOptimizer(muon, adamw(adamw_groups(rest, cfg), cfg))
