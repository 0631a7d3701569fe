"""``gpt kernels check``, ``gpt kernels mutations`` and ``gpt kernels gpucheck``: the commands of
the verification tools, which the plugin's ``gpt kernels`` group offers (:data:`COMMANDS`).
"""

import time

import click

from gptlab.verify.emulator import ALL_SCHEDULES
from gptlab.verify.gpucheck.options import SECTIONS as GPUCHECK_SECTIONS


@click.command("check")
@click.option("--flavour", type=click.Choice(["cpu", "cuda", "cuda-emu", "cuda-emu-numerics"]),
              default="cuda-emu", show_default=True,
              help="cpu: the C kernels; cuda: the nvcc kernels on the GPU (CUDA tensors); "
                   "cuda-emu: the .cu kernels on the CPU under the emulator; cuda-emu-numerics: "
                   "the same with a GPU's numerics (FMA contraction, math functions off by their "
                   "GPU error, another mma order).")
@click.option("--schedule", "schedules", multiple=True, metavar="SPEC",
              help="cuda-emu flavours only: inorder, reverse, greedy, random or random:SEED; "
                   "repeatable. Default: inorder and random:1.")
def check_cmd(flavour, schedules):
    """Run the conformance suite (gptlab.testing) on the fused and flash kernels.

    Outputs and q/k/v gradients against a float64 reference on odd shapes (T up to 255, head
    dims 8-80, causal or not, fewer and more queries than keys), tolerances 1e-4 / 1e-3.
    """
    import contextlib

    import torch

    from gptlab.core.attention import AttentionRequest
    from gptlab.core.errors import BackendNotSupportedError, GptlabError
    from gptlab.plugins.cuda_kernels import backends
    from gptlab.testing import GRAD_TOL, OUT_TOL, default_cases, run_conformance
    from gptlab.verify import emulated, emulator

    if flavour.startswith("cuda-emu"):
        classes = [emulated.on_flavour(c, flavour) if flavour != "cuda-emu" else c
                   for c in (emulated.EmulatedFused, emulated.EmulatedFlash)]
        specs = [emulator.check_schedule(s) for s in schedules or emulator.DEFAULT_SCHEDULES]
        runs = [emulator.schedule(s) for s in specs]
    else:
        if schedules:
            raise click.UsageError("--schedule applies to the cuda-emu flavours only")
        classes = [backends.FusedAttention, backends.FlashAttention]
        runs = [contextlib.nullcontext(None)]
    device = "cuda" if flavour == "cuda" else "cpu"
    request = AttentionRequest(device=device, head_dim=32)
    for cls in classes:
        reasons = cls.not_supported_reasons(request)
        if reasons:
            raise BackendNotSupportedError(f"{cls.name} cannot run on {device}: "
                                           f"{'; '.join(reasons)}")
    failures = 0
    for run in runs:
        with run as spec:
            for cls in classes:
                backend, cases = cls(), default_cases(cls)
                label = f"{cls.name}" + (f" [{spec}]" if spec else "") + f" on {device}"
                start = time.perf_counter()
                results = []
                with click.progressbar(length=len(cases), label=label, file=click.get_text_stream(
                        "stderr")) as bar:
                    try:
                        run_conformance(backend, device=device, cases=cases,
                                        on_result=lambda r: (results.append(r), bar.update(1)))
                    except (AssertionError, GptlabError) as e:  # wrong results, or a launch error
                        failures += 1
                        click.echo(f"{label}: FAILED\n{e}")
                        continue
                worst_out = max(r.out_error for r in results)
                worst_grad = max(r.grad_error for r in results)
                click.echo(f"{label}: {len(results)}/{len(cases)} cases pass, worst out err "
                           f"{worst_out:.1e} (tol {OUT_TOL:g}), grad err {worst_grad:.1e} "
                           f"(tol {GRAD_TOL:g}), {time.perf_counter() - start:.1f}s")
    if device == "cuda":
        torch.cuda.synchronize()
    if failures:
        raise click.ClickException(f"{failures} conformance run(s) failed")


@click.command("mutations")
@click.option("--detector", "detectors", multiple=True,
              type=click.Choice([*ALL_SCHEDULES, "racecheck"]),
              help="Run only this detector; repeatable. Default: all five.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the table, under a heading that says what ran, to this markdown "
                   "file (the repository keeps benchmarks/results/mutations.md).")
@click.pass_context
def mutations_cmd(ctx, detectors, out_path):
    """Remove each __syncthreads, __syncwarp and atomicAdd of the CUDA kernels in turn and show
    what catches it (a Markdown table).

    Each removal ($GPTLAB_EMU_MUTATE=FILE:LINE) runs small cases of the kernels of its file on
    the emulator under each schedule (caught: results out of tolerance or a launch error) and
    under the race detector (flavour cuda-emu-racecheck; caught: a race report). Fails if some
    removal is caught by nothing and not allowlisted (mutations.ALLOWLIST). About 30 s.
    """
    from pathlib import Path

    from gptlab.verify import mutations

    chosen = detectors or mutations.DETECTORS
    outcomes = mutations.run_all(chosen)
    click.echo(mutations.table(outcomes))
    if out_path:
        command = " ".join(["gpt", *ctx.command_path.split()[1:],
                            *(f"--detector {d}" for d in detectors), "--out", out_path])
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(mutations.page(outcomes, chosen, command))
        click.echo(f"table: {path}")
    missed = [str(o.site) for o in outcomes if not o.caught_by and not o.allowed]
    if missed:
        raise click.ClickException(f"removing {', '.join(missed)} is caught by nothing")


def _int_list(value: str, param: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise click.BadParameter(f"comma-separated integers >= 1, got {value!r}",
                                 param_hint=param)
    return out


@click.command("gpucheck")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Markdown report to write. Default: benchmarks/results/gpucheck-<gpu>.md "
                   "(gpucheck-emulated.md with --emulate).")
@click.option("--emulate", is_flag=True,
              help="Rehearse on the CPU: the .cu kernels run by the CUDA emulator, small "
                   "shapes, sdpa on the CPU as the baseline (no GPU numbers).")
@click.option("--sections", default=",".join(GPUCHECK_SECTIONS), show_default=True,
              help="Comma-separated sections to run.")
@click.option("--batch", "B", type=click.IntRange(min=1), default=None,
              help="Benchmark batch B (default 8; 1 with --emulate).")
@click.option("--heads", "H", type=click.IntRange(min=1), default=None,
              help="Benchmark heads H (default 12; 2 with --emulate).")
@click.option("--seq-len", "T", type=click.IntRange(min=1), default=None,
              help="Benchmark sequence length T (default 2048; 64 with --emulate).")
@click.option("--head-dims", default=None, metavar="D,D",
              help="Benchmark head dims (default 64,128; 32 with --emulate).")
@click.option("--reps", type=click.IntRange(min=1), default=None,
              help="Timed runs per benchmark point, the median reported (default 10; 3 with "
                   "--emulate).")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Untimed runs before them (default 3; 1 with --emulate).")
@click.option("--rule-seq-len", type=click.IntRange(min=1), default=None,
              help="T of the precision rule's long causal case (default 2048; 256 with "
                   "--emulate).")
@click.option("--quick", is_flag=True,
              help="Conformance on T in {1, 7, 65} and head dims {16, 80} only (35 cases per "
                   "backend instead of 151).")
@click.option("--sanitizer-timeout", type=click.FloatRange(min=1), default=120.0,
              show_default=True, help="Seconds each compute-sanitizer tool may take.")
@click.pass_context
def gpucheck_cmd(ctx, out_path, emulate, sections, B, H, T, head_dims, reps, warmup,
                 rule_seq_len, quick, sanitizer_timeout):
    """Check the CUDA kernels on this GPU and write one markdown report (under 10 minutes on
    an H100).

    Sections: environment (GPU, driver, torch, nvcc, the cuda build, ptxas registers / spills /
    shared memory and the occupancy each implies here); conformance (every CUDA attention
    backend and layer kernel of gptlab, per dtype each declares, and FlashAttention's precision
    rule at a long causal sequence); layouts (storage-offset, odd-stride inputs); streams (a
    side stream with wait_stream); graphs (CUDA-graph capture of each kernel's first launch, and
    replay); devices (cuda:1 tensors while cuda:0 is current, no context made on GPU 0: needs
    two GPUs); faults (a kernel made to read an illegal address is reported by its own op
    under GPTLAB_CUDA_SYNC=1, later without); sanitizer (compute-sanitizer memcheck,
    racecheck, synccheck on a small run of every kernel, where compute-sanitizer is on PATH);
    benchmark (forward and forward+backward vs sdpa: median CUDA-event time, TFLOP/s, peak
    memory). All but the benchmark run with
    GPTLAB_CUDA_SYNC=1. A section that raises is one line in the report and the next one runs;
    the exit code is 1 if any check failed. Without a GPU (and without --emulate) it stops with
    one line saying why.
    """
    from pathlib import Path

    import attrs

    from gptlab.options import registry
    from gptlab.verify.gpucheck import check, targets
    from gptlab.verify.gpucheck.options import SECTIONS, Options

    chosen = tuple(x.strip() for x in sections.split(",") if x.strip())
    unknown = [x for x in chosen if x not in SECTIONS]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown section(s) {', '.join(unknown) or '(none)'}; known: "
                                 f"{', '.join(SECTIONS)}", param_hint="--sections")
    overrides = {k: v for k, v in {
        "B": B, "H": H, "T": T, "reps": reps, "warmup": warmup, "rule_T": rule_seq_len,
        "head_dims": _int_list(head_dims, "--head-dims") if head_dims else None,
    }.items() if v is not None}
    overrides.update(sections=chosen, sanitizer_timeout_s=sanitizer_timeout, quick=quick)
    options = (Options.emulated(**overrides) if emulate
               else attrs.evolve(Options(), **overrides))
    reg = registry(ctx)
    if not emulate:
        targets.require_gpu()
    target = targets.emulated_target(reg) if emulate else targets.cuda_target(reg)
    path = Path(out_path) if out_path else check.default_out(target)

    def progress(message):
        click.echo(f"gpucheck {message}", err=True)

    progress(f"checking {', '.join(c.name for c in target.attention)} and layer kernels "
             f"{', '.join(c.name for c in target.layer_kernels)} on {target.device}"
             + (" (emulated)" if emulate else "") + f"; report: {path}")
    report = check.GpuCheck(target, options, progress).run(
        " ".join(["gpt", *ctx.command_path.split()[1:]]) + (" --emulate" if emulate else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.markdown())
    for section in report.sections:
        click.echo(f"{section.title}: {'FAIL' if section.failed else 'pass'} "
                   f"({section.seconds:.1f}s)")
    click.echo(f"report: {path}")
    if report.failed:
        raise click.ClickException(f"{len(report.failed)} of {len(report.sections)} sections "
                                   f"failed ({', '.join(report.failed)}); see {path}")


COMMANDS = (check_cmd, mutations_cmd, gpucheck_cmd)
