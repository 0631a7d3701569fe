"""An example third-party gptlab plugin: an attention backend, a block, a norm, an MLP and a
command, written against gptlab's public API only (``gptlab`` and ``gptlab.nn``).

- ``chunked`` attention: exact attention, ``chunk`` query rows at a time (bounded score memory);
- ``parallel`` block: the block of GPT-J (Wang & Komatsuzaki 2021) and PaLM (Chowdhery et al.
  2022): attention and MLP read the same normalised input, their outputs summed into the residual;
- ``scalenorm`` norm (Nguyen & Salazar 2019): ``g * x / ||x||`` with one learned scalar;
- ``geglu`` MLP (Shazeer 2020): ``(gelu(x W1) * (x W3)) W2``, hidden 8C/3;
- ``gpt example-hello``: a subcommand.
"""

import click
import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab import AttentionBackend, Block, FeedForward, Norm, hookimpl
from gptlab.nn import MultiHeadAttention, causal_mask, default_scale


class ChunkedAttention(AttentionBackend):
    """Exact attention, computed ``chunk`` query rows at a time (bounded score memory)."""

    name = "chunked"
    priority = 5  # below the built-ins: ``auto`` only picks it if nothing better fits
    description = "example plugin: exact attention in chunks of 32 queries"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float32, torch.float64})
    supports_dropout = False
    chunk = 32

    def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
        scale = default_scale(q.size(-1), scale)
        tq, tk = q.size(-2), k.size(-2)
        mask = causal_mask(tq, tk, device=q.device) if causal else None
        outs = []
        for start in range(0, tq, self.chunk):
            qc = q[..., start:start + self.chunk, :]  # (B, nh, c, hs)
            s = (qc @ k.transpose(-2, -1)) * scale  # (B, nh, c, Tk)
            if mask is None:
                outs.append(F.softmax(s, dim=-1) @ v)
                continue
            keep = mask[start:start + self.chunk]  # (c, Tk)
            blind = ~keep.any(dim=-1, keepdim=True)  # rows that see no key (tq > tk): give 0
            p = F.softmax(s.masked_fill(~(keep | blind), float("-inf")), dim=-1)
            outs.append(p.masked_fill(blind, 0.0) @ v)
        return torch.cat(outs, dim=-2)  # (B, nh, Tq, hs)


class ParallelBlock(Block):
    name = "parallel"
    supports_kv_cache = True
    description = "example plugin: x + attn(ln(x)) + mlp(ln(x))  (GPT-J)"

    def __init__(self, config, components):
        super().__init__(config, components)
        self.ln = components.norm(config.n_embd, bias=config.bias)  # --norm
        self.attn = MultiHeadAttention(config, components.attention, components.position)
        self.mlp = components.mlp(config)  # --mlp

    def forward(self, x, kv_cache=None):
        h = self.ln(x)
        return x + self.attn(h, kv_cache) + self.mlp(h)


class ScaleNorm(Norm):
    """``g * x / ||x||`` over the last dim, ``g`` one learned scalar starting at sqrt(ndim)."""

    name = "scalenorm"
    description = "example plugin: g * x / ||x||, one learned scalar (Nguyen & Salazar 2019)"

    def __init__(self, ndim, bias=True, eps=1e-5):
        super().__init__(ndim, bias, eps)
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(float(ndim) ** 0.5))

    def forward(self, x):  # (..., C) -> (..., C)
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


class GEGLU(FeedForward):
    """``(gelu(x W1) * (x W3)) W2``; the last Linear, into the residual stream, is ``c_proj``
    (so GPT-2's init scales it, as every MLP's)."""

    name = "geglu"
    description = "example plugin: gelu(x W1) * (x W3) -> W2, hidden 8C/3 (Shazeer 2020)"

    def __init__(self, config):
        super().__init__(config)
        hidden = 8 * config.n_embd // 3
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # W1 and W3
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.c_proj(F.gelu(gate) * up)


@hookimpl
def register_attention_backends():
    return ChunkedAttention


@hookimpl
def register_blocks():
    return [ParallelBlock]


@hookimpl
def register_norms():
    return [ScaleNorm]


@hookimpl
def register_mlps():
    return [GEGLU]


@click.command("example-hello")
def hello():
    """Say hello from the example plugin."""
    click.echo("hello from gptlab-example-plugin")


@hookimpl
def register_commands(cli):
    cli.add_command(hello)
