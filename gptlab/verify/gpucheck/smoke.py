"""The small-case run that compute-sanitizer watches: every kernel of a target once, on small
shapes. ``python -m gptlab.verify.gpucheck.smoke [--emulate]`` runs it and prints one line per
call."""

from __future__ import annotations

import sys

from gptlab.verify.gpucheck.targets import (Target, cuda_target, dtype_name, dtypes_of,
                                            emulated_target, require_gpu)


def smoke(target: Target) -> list[str]:
    """Run every kernel of ``target`` once on small shapes: each attention backend per
    supported dtype at head dims 32, 64 and 128 (the CUDA flash kernel's three register
    layouts), causal and not, forward and backward; each layer kernel's three operations,
    forward and backward. Returns one line per call."""
    import torch
    import torch.nn as nn

    done, dev = [], target.device
    gen = torch.Generator().manual_seed(0)
    for cls in target.attention:
        for dtype in dtypes_of(cls):
            for D in (32, 64, 128):
                for causal in (True, False):
                    if cls.not_supported_reasons(target.attention_request(dtype, D=D, T=65,
                                                                          causal=causal)):
                        continue
                    q, k, v = (torch.randn(1, 2, 65, D, generator=gen).to(dev, dtype)
                               .requires_grad_() for _ in range(3))
                    cls()(q, k, v, causal=causal).sum().backward()
                    done.append(f"{cls.name} {dtype_name(dtype)} D={D} causal={causal}")
    for cls in target.layer_kernels:
        for dtype in dtypes_of(cls):
            if cls.not_supported_reasons(target.kernel_request(dtype)):
                continue
            kern = cls()
            x = torch.randn(33, 65, generator=gen).to(dev, dtype).requires_grad_()
            w, b = (torch.randn(65, generator=gen).to(dev, dtype).requires_grad_()
                    for _ in range(2))
            kern.layer_norm(x, w, b, 1e-5).sum().backward()
            linear = nn.Linear(65, 130).to(dev, dtype)
            kern.linear_gelu(x, linear).sum().backward()
            logits = torch.randn(33, 130, generator=gen).to(dev, dtype).requires_grad_()
            kern.cross_entropy(logits, torch.randint(0, 130, (33,), generator=gen).to(dev)
                               ).backward()
            done.append(f"{cls.name} {dtype_name(dtype)}: layer_norm, linear_gelu, "
                        f"cross_entropy")
    if dev == "cuda":
        torch.cuda.synchronize()
    return done


def main(argv: list[str]) -> int:
    from gptlab.core.plugins import load_registry

    if argv not in ([], ["--emulate"]):
        sys.exit("usage: python -m gptlab.verify.gpucheck.smoke [--emulate]")
    reg = load_registry()
    emulate = argv == ["--emulate"]
    if not emulate:
        require_gpu()
    target = emulated_target(reg) if emulate else cuda_target(reg)
    for line in smoke(target):
        print(f"smoke: {line}")  # noqa: T201 (a script's output)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    sys.exit(main(sys.argv[1:]))
