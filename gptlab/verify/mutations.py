"""Mutation testing of the CUDA kernels' synchronisation: is every barrier and atomic needed, and
would the emulator notice if it went missing?

Every ``__syncthreads``, ``__syncwarp`` and ``atomicAdd`` in the plugin's ``csrc/cuda/*.cu`` and
``*.cuh`` is a *site* (found by scanning the sources with comments stripped, so a new one is
picked up). Each site is removed in turn (``$GPTLAB_EMU_MUTATE``: the barrier returns at once,
the atomicAdd becomes a plain read-modify-write) and small cases of the ops whose kernels the
file holds (a header: of the ``.cu`` files that include it) run under each *detector*:

- a schedule of the emulator (``inorder``, ``reverse``, ``greedy``, ``random:1``) on the
  ``cuda-emu`` flavour: caught if a result is out of tolerance or the launch fails;
- ``racecheck``: the ``cuda-emu-racecheck`` flavour (inorder): caught if it reports a race.

A site that no detector catches must be in :data:`ALLOWLIST` with the reason its removal is
harmless; ``tests/kernels/test_mutations.py`` asserts this, and ``gpt kernels mutations`` prints
the table (``--out``: a markdown page, :func:`page`; ``benchmarks/results/mutations.md``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F

from gptlab.core.errors import GptlabError
from gptlab.plugins.cuda_kernels import build, ops
from gptlab.plugins.cuda_kernels.abi import CSRC
from gptlab.verify import emulated, emulator

CUDA_DIR = CSRC / "cuda"
SCHEDULES = emulator.ALL_SCHEDULES
RACECHECK = "racecheck"
DETECTORS = (*SCHEDULES, RACECHECK)

#: Sites whose removal is provably harmless, as {"file: source line": why}. (Keyed by the line's
#: text, not its number, so edits elsewhere keep it.) Racecheck, which records every shared
#: access of these kernels (ldmatrix and cp.async included), finds no race without them either.
ALLOWLIST: dict[str, str] = {
    "flash_tc.cu: __syncthreads(); /* nobody still reads the previous query tile or dSᵀ */": (
        "redundant: in the backward's query loop, every read of q_s, do_s, l_s, d_s in "
        "iteration i comes before the __syncthreads after dSᵀ is written (i), and every write of "
        "them in iteration i+1 (cp.async issue and completion, the l_s/d_s stores) after it; "
        "every read of dSᵀ in i comes before the __syncthreads after the cp.async wait (i+1), and "
        "dSᵀ is next written after it; K and V are not written in the loop, and nothing is read "
        "before the first iteration"),
}

_SITE = re.compile(r"\b(__syncthreads|__syncwarp|atomicAdd)\s*\(")
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
_COMMENT_OR_STRING = re.compile(rf'{_COMMENT.pattern}|"(?:\\.|[^"\\\n])*"', re.DOTALL)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


@attrs.frozen
class Site:
    file: str  # base name, as $GPTLAB_EMU_MUTATE takes it
    line: int
    kind: str  # __syncthreads, __syncwarp or atomicAdd
    code: str  # the source line, stripped

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def key(self) -> str:
        return f"{self.file}: {self.code}"


@attrs.frozen
class Outcome:
    site: Site
    caught_by: tuple[str, ...]  # detectors that noticed, in DETECTORS order
    details: dict  # detector -> what it saw (first line)

    @property
    def allowed(self) -> str | None:
        return ALLOWLIST.get(self.site.key)


def _blank(m: re.Match) -> str:
    """A comment or string literal as spaces, keeping its newlines (so lines keep numbers)."""
    return re.sub(r"[^\n]", " ", m.group(0))


def _code(path: Path, *, strings: bool = False) -> str:
    """The source with comments (and, unless ``strings``, string literals) blanked."""
    return (_COMMENT if strings else _COMMENT_OR_STRING).sub(_blank, path.read_text())


def sources(root: Path = CUDA_DIR) -> list[Path]:
    return sorted(root.glob("*.cu")) + sorted(root.glob("*.cuh"))


def find_sites(root: Path = CUDA_DIR) -> list[Site]:
    """Every __syncthreads, __syncwarp and atomicAdd call in the CUDA sources, in file order."""
    sites = []
    for path in sources(root):
        code, lines = _code(path), path.read_text().splitlines()
        for m in _SITE.finditer(code):
            line = code.count("\n", 0, m.start()) + 1
            sites.append(Site(path.name, line, m.group(1), lines[line - 1].strip()))
    return sites


def including_units(header: str, root: Path = CUDA_DIR) -> list[str]:
    """The .cu files that include ``header``, directly or through other headers."""
    includes = {p.name: {Path(i).name for i in _INCLUDE.findall(_code(p, strings=True))}
                for p in sources(root)}

    def reaches(name: str, seen: frozenset = frozenset()) -> bool:
        return header in includes.get(name, ()) or any(
            reaches(i, seen | {name}) for i in includes.get(name, ()) if i not in seen)

    return [n for n in includes if n.endswith(".cu") and reaches(n)]


# ------------------------------------------------------------------------ the checks
def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / (|ref| + rms(ref)); NaN counts as infinitely wrong."""
    out, ref = out.double(), ref.double()
    rms = ref.pow(2).mean().sqrt().item() if ref.numel() else 0.0
    err = ((out - ref).abs() / (ref.abs() + (rms or 1.0))).nan_to_num(float("inf"))
    return err.max().item() if err.numel() else 0.0


def _compare(name: str, fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor],
             tol: float = 1e-4) -> str | None:
    """Outputs and input gradients of ``fn`` (float32 kernels) vs ``ref_fn`` in float64."""
    gen = torch.Generator().manual_seed(1)
    leaves = [t.clone().requires_grad_() for t in inputs]
    refs = [t.double().requires_grad_() for t in inputs]
    out, ref = fn(*leaves), ref_fn(*refs)
    dy = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_grads = torch.autograd.grad(ref, refs, dy.double())
    errors = [_rel_error(out, ref)] + [_rel_error(g, r) for g, r in zip(grads, ref_grads)]
    return None if max(errors) < tol else f"{name}: error {max(errors):.2e} (tol {tol:g})"


def _inputs(*shapes, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) for s in shapes]


def emulated_backend(base: type, flavour: str):
    """A ``base`` (EmulatedFlash or EmulatedFused) whose kernels run on another emulator flavour
    (e.g. racecheck). An instance, not a subclass: tools that list the subclasses of
    ``emulated.Emulated`` (gpucheck's emulated target) must not find it."""
    backend = base()
    backend.flavour, backend.name = flavour, f"{base.name}[{flavour}]"
    return backend


#: Small attention cases: two query tiles and two key tiles in the forward (a K/V tile is
#: restaged), dQ rows written by two key blocks in the backward (atomicAdd), odd sizes.
ATTENTION_CASES = ((1, 1, 40, 40, 8, True), (1, 2, 33, 33, 16, False))


def _attention(base: type, flavour: str) -> str | None:
    from gptlab.testing import Case, check_case

    backend = emulated_backend(base, flavour)
    for args in ATTENTION_CASES:
        r = check_case(backend, Case(*args))
        if not r.ok:
            return f"{backend.name} {r.case}: out err {r.out_error:.1e}, grad err " \
                   f"{r.grad_error:.1e}"
    return None


#: Tensor-core cases (bfloat16, head dim 64, B = H = 1): at T = 130 the forward has two query
#: tiles and three key tiles (both stages refilled), the backward three key blocks whose dQ rows
#: overlap (atomicAdd) and nine query tiles per block; causal (partial tiles) and not.
TC_CASES = ((130, True), (97, False))


def _flash_tc(flavour: str) -> str | None:
    from gptlab.testing import check_precision

    backend = emulated_backend(emulated.EmulatedTensorCoreFlash, flavour)
    for T, causal in TC_CASES:
        r = check_precision(backend, T=T, D=64, causal=causal, dtype=torch.bfloat16)
        if not r.ok:
            return str(r)
    return None


def _layer_norm(flavour: str) -> str | None:
    x, w, b = _inputs((9, 33), (33,), (33,))
    return _compare("layer_norm (9, 33)",
                    lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, flavour)[0],
                    lambda x, w, b: F.layer_norm(x, (33,), w, b, 1e-5), [x, w, b])


def _cross_entropy(flavour: str) -> str | None:
    (logits,) = _inputs((7, 33))
    targets = torch.arange(7) * 5 % 33
    return _compare("cross_entropy (7, 33)", lambda x: ops.cross_entropy(x, targets, flavour),
                    lambda x: F.cross_entropy(x, targets), [logits])


def _bias_gelu(flavour: str) -> str | None:
    x, b = _inputs((9, 33), (33,))
    return _compare("bias_gelu (9, 33)", lambda x, b: ops.bias_gelu(x, b, flavour),
                    lambda x, b: F.gelu(x + b), [x, b])


#: The checks of the kernels in each .cu file, taking the flavour to run.
CHECKS: dict[str, tuple[Callable[[str], str | None], ...]] = {
    "flash.cu": (functools.partial(_attention, emulated.EmulatedFlash),),
    "softmax.cu": (functools.partial(_attention, emulated.EmulatedFused),),
    "flash_tc.cu": (_flash_tc,),
    "layernorm.cu": (_layer_norm,),
    "cross_entropy.cu": (_cross_entropy,),
    "bias_gelu.cu": (_bias_gelu,),
    "runtime.cu": (),
}


def checks_for(file: str) -> tuple[Callable[[str], str | None], ...]:
    """The checks that run the kernels of ``file`` (a header: of every .cu including it)."""
    units = [file] if file.endswith(".cu") else including_units(file)
    missing = [u for u in units if u not in CHECKS]
    if missing or not units:
        raise GptlabError(f"no mutation checks for {', '.join(missing) or file}: add them to "
                          f"gptlab.verify.mutations.CHECKS")
    return tuple(c for u in units for c in CHECKS[u])


def detect(checks, detector: str) -> str | None:
    """What ``detector`` sees running ``checks`` under the current mutation: None if nothing."""
    flavour = build.CUDA_EMU_RACECHECK.name if detector == RACECHECK else build.CUDA_EMU.name
    with emulator.schedule("inorder" if detector == RACECHECK else detector):
        for check in checks:
            try:
                failure = check(flavour)
            except GptlabError as e:  # a launch error (deadlock, bad smem, race ...)
                message = str(e).splitlines()[0]
                if detector != RACECHECK or "race on" in message:
                    return message
                continue
            if failure and detector != RACECHECK:  # racecheck counts races only
                return failure
    return None


def run_site(site: Site, detectors=DETECTORS) -> Outcome:
    checks = checks_for(site.file)
    details = {}
    with emulator.mutate(str(site)):
        for detector in detectors:
            if seen := detect(checks, detector):
                details[detector] = seen
    return Outcome(site, tuple(d for d in detectors if d in details), details)


def run_all(detectors=DETECTORS, sites: list[Site] | None = None) -> list[Outcome]:
    return [run_site(s, detectors) for s in (find_sites() if sites is None else sites)]


def table(outcomes: list[Outcome]) -> str:
    """The outcomes as a Markdown table: site, code, caught by (or why allowed)."""
    rows = ["| site | code | removal caught by |", "|---|---|---|"]
    for o in outcomes:
        verdict = ", ".join(o.caught_by) or (f"allowed: {o.allowed}" if o.allowed
                                             else "**nothing**")
        rows.append(f"| `{o.site}` | `{o.site.code}` | {verdict} |")
    return "\n".join(rows)


def page(outcomes: list[Outcome], detectors=DETECTORS, command: str = "gpt kernels mutations"
         ) -> str:
    """A markdown page: a title, what ``command`` ran with which ``detectors``, the table."""
    schedules = ", ".join(d for d in detectors if d != RACECHECK)
    what = []
    if schedules:
        what.append(f"schedules of the CUDA emulator ({schedules}; caught: a result out of "
                    f"tolerance or a launch error)")
    if RACECHECK in detectors:
        what.append("its race detector (racecheck; caught: a race report)")
    return "\n".join([
        "# Mutations of the CUDA kernels' barriers and atomics", "",
        f"Written by `{command}`. Each `__syncthreads`, `__syncwarp` and `atomicAdd` of "
        f"`gptlab/plugins/cuda_kernels/csrc/cuda/` is removed in turn, and small cases of the "
        f"kernels of its file run under {' and under '.join(what)}. A removal that nothing "
        f"catches must be allowlisted (`gptlab.verify.mutations.ALLOWLIST`) with the reason it "
        f"is harmless.", "",
        table(outcomes), ""])
