"""Generation: the decoding loop (with or without the KV cache), sampling, and text in/out.

The loop is nanoGPT's ``generate`` with a KV cache: after the prompt, one new token is computed
per step against the keys and values cached from earlier steps. Sampling supports temperature
(0 = greedy), top-k, and nucleus (top-p) sampling (Holtzman et al. 2019, "The Curious Case of
Neural Text Degeneration").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from gptlab.core.config import MAX_SEED
from gptlab.core.errors import ConfigError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   seed: int | None = None) -> None:
    """Validate sampling options (before anything is generated or printed)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, 2**63 - 1], got {seed}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             on_token: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` sampled tokens to ``idx`` (B, T); returns (B, T + n).

    ``temperature=0`` is greedy decoding; ``top_k`` keeps the k likeliest tokens, ``top_p``
    the smallest set whose probability reaches p (nucleus sampling). ``on_token(next_ids)``
    is called after each step; returning ``False`` stops early.

    Context window: the model sees ``idx[:, start:]``. When that would exceed
    ``block_size``, ``start`` jumps so that the last ``block_size // 2`` tokens are kept
    (with the KV cache: the cache is dropped and those tokens recomputed). The same rule is
    used with and without the cache, so greedy outputs are identical either way.
    """
    check_sampling(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(1) < 1:
        raise ConfigError("generate needs a (B, T) prompt with T >= 1 token")
    block, keep = model.config.block_size, max(1, model.config.block_size // 2)
    use_cache = use_cache and model.kv_cache_usable()
    B, n = idx.shape  # n: tokens so far
    # the prompt, then each new token in turn; grown as it fills (doubling), so that a request
    # for many tokens allocates only what has been generated, not the request up front
    total = n + max_new_tokens
    out = idx.new_empty(B, min(total, n + max(block, 1024)))
    out[:, :n] = idx
    start, cache = 0, None
    for _ in range(max_new_tokens):
        if n == out.size(1):
            out = torch.cat([out, out.new_empty(B, min(n, total - n))], dim=1)
        if n - start > block:
            start, cache = n - keep, None
        if not use_cache:
            logits, _ = model(out[:, start:n])
        elif cache is None:
            cache = model.new_cache()
            logits = model.forward_cached(out[:, start:n], cache)
        else:
            logits = model.forward_cached(out[:, n - 1:n], cache)  # the newest token only
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        out[:, n:n + 1] = nxt
        n += 1
        if on_token is not None and on_token(nxt) is False:
            break
    return out[:, :n]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Pick the next token from ``logits`` (B, vocab); returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # shift the max to 0 first: a tiny temperature then sends the rest to -inf, never to NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the likelier tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def sample_text(model, tokenizer, prompt: str = "", max_new_tokens: int = 300, *,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                seed: int | None = None, stop: str | None = None, use_cache: bool = True,
                on_text: Callable[[str], None] | None = None) -> str:
    """Generate a continuation of ``prompt``; returns prompt + generated text.

    ``stop``: end as soon as the generated text contains this string (it is kept in the
    output). ``on_text`` receives each newly generated piece of text (for streaming).
    """
    check_sampling(temperature, top_k, top_p, seed)
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) if prompt else [0]  # no prompt: start from token 0
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    pieces: list[str] = []
    tail = max(len(stop), 1) * 2 if stop else 0

    def on_token(nxt):
        piece = tokenizer.decode(nxt[0].tolist())
        pieces.append(piece)
        if on_text:
            on_text(piece)
        if stop and stop in "".join(pieces[-tail:]):
            return False
        return True

    generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             generator=gen, use_cache=use_cache, on_token=on_token)
    return (prompt if prompt else "") + "".join(pieces)
