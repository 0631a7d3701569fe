"""Mutation testing of the CUDA kernels' barriers and atomics (gptlab/verify/mutations.py): every
__syncthreads, __syncwarp and atomicAdd in csrc/cuda/ is removed in turn, and its removal
must be caught by a schedule of the emulator or by its race detector, or be allowlisted with the
reason it is harmless. Small cases only (flash_tc.cu: bfloat16, head dim 64, T = 97 and 130):
the whole module takes about 25 s once the emulator libraries are built."""

import re

import pytest
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.verify import mutations


@pytest.fixture(scope="module")
def outcomes():
    return {str(o.site): o for o in mutations.run_all()}


def _site(text: str, file: str = "flash.cu", after: str | None = None) -> str:
    """FILE:LINE of the one site in ``file`` whose source line contains ``text`` (and, with
    ``after``, the first such site below a line containing ``after``)."""
    sites = [s for s in mutations.find_sites() if s.file == file and text in s.code]
    if after is not None:
        lines = (mutations.CUDA_DIR / file).read_text().splitlines()
        start = next(i for i, line in enumerate(lines, 1) if after in line)
        sites = [min((s for s in sites if s.line > start), key=lambda s: s.line)]
    (site,) = sites
    return str(site)


def test_sites_are_found_in_code_only():
    sites = mutations.find_sites()
    kinds = {s.kind for s in sites}
    assert kinds == {"__syncthreads", "__syncwarp", "atomicAdd"}
    assert {s.file for s in sites} >= {"flash.cu", "flash_tc.cu", "cross_entropy.cu",
                                       "rowwise.cuh"}
    for s in sites:  # each names a real call on its line, never one in a comment
        assert s.code.startswith(s.kind) or f" {s.kind}(" in s.code or f"({s.kind}(" in s.code
    # flash.cu's header comment mentions atomicAdd; rowwise.cuh's says "no atomicAdd anywhere"
    assert [s.kind for s in sites if s.file == "rowwise.cuh"] == ["__syncthreads"]
    assert [s.kind for s in sites if s.file == "flash.cu"].count("atomicAdd") == 1
    assert [s.kind for s in sites if s.file == "flash_tc.cu"] == ["__syncthreads"] * 6 + \
        ["atomicAdd"]
    assert mutations.including_units("tensor_core.cuh") == ["flash_tc.cu"]  # no site of its own


def test_headers_are_checked_through_the_files_that_include_them(tmp_path):
    assert mutations.including_units("rowwise.cuh") == ["bias_gelu.cu", "layernorm.cu"]
    (tmp_path / "a.cu").write_text('#include "b.cuh"\n/* #include "c.cuh" */\n')
    (tmp_path / "b.cuh").write_text('#include "c.cuh"\n')
    (tmp_path / "c.cuh").write_text("__device__ void f() { __syncthreads(); }\n")
    assert mutations.including_units("c.cuh", tmp_path) == ["a.cu"]
    assert [str(s) for s in mutations.find_sites(tmp_path)] == ["c.cuh:1"]


def test_every_removal_is_caught_or_allowlisted(outcomes):
    missed = [str(o.site) for o in outcomes.values() if not o.caught_by and not o.allowed]
    assert not missed, f"caught by nothing:\n{mutations.table(list(outcomes.values()))}"
    stale = [str(o.site) for o in outcomes.values() if o.caught_by and o.allowed]
    assert not stale, f"allowlisted but caught (remove them from ALLOWLIST): {stale}"
    assert set(mutations.ALLOWLIST) <= {o.site.key for o in outcomes.values()}


def test_the_misses_of_the_old_emulator_are_caught(outcomes):
    """Three removals that passed every conformance case under inorder and random before."""
    # warps in lockstep hid it: greedy lets one warp restage K/V while others still read them
    kv_restage = outcomes[_site("nobody still reads the previous K, V tile")]
    assert kv_restage.caught_by == ("greedy", "racecheck")
    assert "race on shared memory" in kv_restage.details["racecheck"]
    # a shuffle orders nothing on the hardware: only racecheck sees lanes reading p too late
    p_row = outcomes[_site("every lane has read this row's p")]
    assert p_row.caught_by == ("racecheck",)
    assert "flash.cu" in p_row.details["racecheck"] and "a write by thread" in \
        p_row.details["racecheck"]
    # dQ += from two key blocks without atomicAdd
    dq = outcomes[_site("atomicAdd(&dq_acc")]
    assert dq.caught_by == ("racecheck",)
    assert "race on global memory" in dq.details["racecheck"]
    assert "only atomicAdd may meet atomicAdd" in dq.details["racecheck"]


def test_the_barriers_that_lockstep_hid_in_flash_tc_are_caught(outcomes):
    """Three removals in flash_tc.cu that passed every test when warps ran in lockstep and ldmatrix
    read its rows once the whole warp had arrived. Now each lane reads its row when it arrives
    (so a warp can read rows that another warp, later in the round, has not written yet), greedy
    runs a warp on to its next __syncthreads, and racecheck sees ldmatrix and cp.async."""
    # the forward's barrier closing a key tile: the next tile read before other threads' waits
    tile_end = outcomes[_site("tile j + 1 is in", "flash_tc.cu")]
    assert {"greedy", "racecheck"} <= set(tile_end.caught_by)
    assert re.search(r"race on shared memory, .* at flash_tc.cu:\d+ and .* at flash_tc.cu:\d+",
                     tile_end.details["racecheck"])
    # the backward's dSᵀ written by each warp, then read by all through ldmatrix.trans
    ds = outcomes[_site("__syncthreads();", "flash_tc.cu", after="dSᵀ to shared memory")]
    assert {"greedy", "racecheck"} <= set(ds.caught_by)
    assert "race on shared memory" in ds.details["racecheck"]
    # the backward's barrier before a query tile is reloaded: provably redundant (the proof is
    # the allowlist's), and racecheck, which sees every shared access, agrees
    reload = outcomes[_site("nobody still reads the previous query tile", "flash_tc.cu")]
    assert reload.caught_by == () and reload.allowed
    # dQ += from three key blocks without atomicAdd
    dq = outcomes[_site("atomicAdd(&dq_acc", "flash_tc.cu")]
    assert dq.caught_by == ("racecheck",) and "race on global memory" in dq.details["racecheck"]


def test_unmutated_kernels_pass_every_detector():
    """Else a mutant 'caught' would prove nothing."""
    for file in ("flash.cu", "softmax.cu", "flash_tc.cu", "rowwise.cuh", "cross_entropy.cu"):
        for detector in mutations.DETECTORS:
            assert mutations.detect(mutations.checks_for(file), detector) is None, \
                (file, detector)


def test_the_table_lists_every_site(outcomes):
    text = mutations.table(list(outcomes.values()))
    assert text.splitlines()[0] == "| site | code | removal caught by |"
    assert len(text.splitlines()) == 2 + len(outcomes)
    assert "| `flash.cu:" in text and "| `flash_tc.cu:" in text and "racecheck |" in text
    assert "**nothing**" not in text and text.count("| allowed: ") == len(mutations.ALLOWLIST)


def test_kernels_mutations_command_prints_the_table(registry, tmp_path):
    """With racecheck alone (it catches every removal but the allowlisted), the table also
    written to --out under a heading; a detector that misses some fails."""
    out = tmp_path / "results" / "mutations.md"
    res = CliRunner().invoke(build_cli(registry), ["kernels", "mutations", "--detector",
                                                   "racecheck", "--out", str(out)])
    assert res.exit_code == 0, res.output
    *lines, written = res.output.splitlines()
    assert lines[0] == "| site | code | removal caught by |"
    assert len(lines) == 2 + len(mutations.find_sites())
    assert all(line.endswith("| racecheck |") or "| allowed: " in line for line in lines[2:])
    assert sum("| allowed: " in line for line in lines) == len(mutations.ALLOWLIST)
    assert written == f"table: {out}"
    page = out.read_text()
    assert page.startswith("# Mutations of the CUDA kernels' barriers and atomics\n")
    assert f"`gpt kernels mutations --detector racecheck --out {out}`" in page
    assert "under its race detector" in page and "schedules" not in page
    assert page.endswith("\n".join(lines) + "\n")
    res = CliRunner().invoke(build_cli(registry), ["kernels", "mutations", "--detector",
                                                   "reverse"])
    missed = [line.split("`")[1] for line in res.output.splitlines()[2:-1]
              if line.endswith("| **nothing** |")]
    assert res.exit_code == 1 and _site("atomicAdd(&dq_acc") in missed
    assert res.output.splitlines()[-1] == f"Error: removing {', '.join(missed)} is caught by " \
                                          f"nothing"


def test_the_checks_leave_no_backend_class_behind(outcomes):
    """gpucheck's emulated target lists the subclasses of emulated.Emulated: running the checks
    on the racecheck flavour must not add one."""
    from gptlab.verify import emulated

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    assert outcomes and not [c for c in subclasses(emulated.Emulated)
                             if c.__module__ == mutations.__name__]
