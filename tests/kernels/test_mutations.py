"""Mutation testing of the CUDA kernels' barriers and atomics (cuda_kernels/mutations.py): every
__syncthreads, __syncwarp and atomicAdd in csrc/cuda/ is removed in turn, and its removal
must be caught by a schedule of the emulator or by its race detector, or be allowlisted with the
reason it is harmless. Small cases only: the whole module takes about 15 s once the emulator
libraries are built."""

import pytest
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.plugins.cuda_kernels import mutations


@pytest.fixture(scope="module")
def outcomes():
    return {str(o.site): o for o in mutations.run_all()}


def _site(text: str, file: str = "flash.cu") -> str:
    """FILE:LINE of the one site in ``file`` whose source line contains ``text``."""
    (site,) = [s for s in mutations.find_sites() if s.file == file and text in s.code]
    return str(site)


def test_sites_are_found_in_code_only():
    sites = mutations.find_sites()
    kinds = {s.kind for s in sites}
    assert kinds == {"__syncthreads", "__syncwarp", "atomicAdd"}
    assert {s.file for s in sites} >= {"flash.cu", "cross_entropy.cu", "rowwise.cuh"}
    for s in sites:  # each names a real call on its line, never one in a comment
        assert s.code.startswith(s.kind) or f" {s.kind}(" in s.code or f"({s.kind}(" in s.code
    # flash.cu's header comment mentions atomicAdd; rowwise.cuh's says "no atomicAdd anywhere"
    assert [s.kind for s in sites if s.file == "rowwise.cuh"] == ["__syncthreads"]
    assert [s.kind for s in sites if s.file == "flash.cu"].count("atomicAdd") == 1


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


def test_unmutated_kernels_pass_every_detector():
    """Else a mutant 'caught' would prove nothing."""
    for file in ("flash.cu", "softmax.cu", "rowwise.cuh", "cross_entropy.cu"):
        for detector in mutations.DETECTORS:
            assert mutations.detect(mutations.checks_for(file), detector) is None, \
                (file, detector)


def test_the_table_lists_every_site(outcomes):
    text = mutations.table(list(outcomes.values()))
    assert text.splitlines()[0] == "| site | code | removal caught by |"
    assert len(text.splitlines()) == 2 + len(outcomes)
    assert "| `flash.cu:" in text and "racecheck |" in text and "**nothing**" not in text


def test_kernels_mutations_command_prints_the_table(registry):
    """With racecheck alone (it catches every removal here); a detector that misses some fails."""
    res = CliRunner().invoke(build_cli(registry), ["kernels", "mutations", "--detector",
                                                   "racecheck"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "| site | code | removal caught by |"
    assert len(lines) == 2 + len(mutations.find_sites())
    assert all(line.endswith("| racecheck |") for line in lines[2:])
    res = CliRunner().invoke(build_cli(registry), ["kernels", "mutations", "--detector",
                                                   "reverse"])
    missed = [line.split("`")[1] for line in res.output.splitlines()[2:-1]
              if line.endswith("| **nothing** |")]
    assert res.exit_code == 1 and _site("atomicAdd(&dq_acc") in missed
    assert res.output.splitlines()[-1] == f"Error: removing {', '.join(missed)} is caught by " \
                                          f"nothing"


def test_the_checks_leave_no_backend_class_behind(outcomes):
    """gpucheck's emulated target lists the subclasses of backends.Emulated: running the checks
    on the racecheck flavour must not add one."""
    from gptlab.plugins.cuda_kernels import backends

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    assert outcomes and not [c for c in subclasses(backends.Emulated)
                             if c.__module__ == mutations.__name__]
