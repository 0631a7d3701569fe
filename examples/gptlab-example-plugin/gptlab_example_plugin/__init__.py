"""An example third-party gptlab plugin: the ``chunked`` attention backend and ``parallel`` block.

``parallel`` is the block of GPT-J (Wang & Komatsuzaki 2021) and PaLM (Chowdhery et al. 2022):
attention and MLP read the same normalised input and their outputs are summed into the residual.
Written against gptlab's public API only: ``gptlab`` and ``gptlab.nn``.
"""

import click
import torch
from torch.nn import functional as F

from gptlab import AttentionBackend, Block, hookimpl
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


@hookimpl
def register_attention_backends():
    return ChunkedAttention


@hookimpl
def register_blocks():
    return [ParallelBlock]


@click.command("example-hello")
def hello():
    """Say hello from the example plugin."""
    click.echo("hello from gptlab-example-plugin")


@hookimpl
def register_commands(cli):
    cli.add_command(hello)
