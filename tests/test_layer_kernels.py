"""Layer kernels (LayerNorm, bias + GELU, the loss) chosen by name like attention backends:
``torch`` is the formula itself, ``native`` matches it, a plugin's are used everywhere, and a
named one that cannot run is an error with its reasons."""

import types

import pytest
import torch
from click.testing import CliRunner

from gptlab import hookimpl
from gptlab.cli import build_cli
import attrs

from gptlab.core.planning import build_model, choose_components
from gptlab.core.config import resolve_configs
from gptlab.core.selection import select
from gptlab.core.errors import BackendNotSupportedError, UnknownComponentError
from gptlab import KernelRequest
from gptlab.nn import TorchKernels
from gptlab.core.plugins import load_registry


def small_model(registry, kernels, bias=True, formulas=False):
    """The tiny preset's model on ``kernels``; ``formulas``: its modules given no layer kernels
    at all (each computes its own PyTorch formula)."""
    mc, _ = resolve_configs("tiny", {"attention": "naive", "kernels": kernels}, {})
    mc = type(mc).from_dict({**mc.to_dict(), "vocab_size": 37, "bias": bias})
    parts = choose_components(registry, mc)
    torch.manual_seed(0)
    return build_model(registry, mc, components=attrs.evolve(parts, kernels=None) if formulas
                       else parts)


def batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 37, (3, 64), generator=g), torch.randint(0, 37, (3, 64), generator=g))


def test_torch_kernels_are_the_formulas_bit_for_bit(registry):
    model, formulas = small_model(registry, "torch"), small_model(registry, "torch", formulas=True)
    assert sum(m.kernels is model.kernels for m in model.modules()
               if hasattr(m, "kernels")) == 1 + 2 * 3 + 1  # the model, 2 x (ln_1, ln_2, mlp), ln_f
    assert all(m.kernels is None for m in formulas.modules() if hasattr(m, "kernels"))
    x, y = batch()
    logits, loss = model(x, y)
    logits0, loss0 = formulas(x, y)
    assert torch.equal(logits, logits0) and torch.equal(loss, loss0)


@pytest.mark.parametrize("bias", [True, False])
def test_native_kernels_train_like_the_formulas(registry, bias):
    native, ref = small_model(registry, "native", bias), small_model(registry, "torch", bias)
    ref.load_state_dict(native.state_dict())
    assert type(native.kernels).__name__ == "NativeKernels"
    x, y = batch()
    (la, lb) = native(x, y)[1], ref(x, y)[1]
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(native.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_auto_takes_the_highest_priority_that_runs_and_a_plugin_is_used_everywhere():
    calls = []

    class Counting(TorchKernels):
        name, priority = "counting", 1000

        def layer_norm(self, *a):
            calls.append("layer_norm")
            return super().layer_norm(*a)

        def linear_gelu(self, *a):
            calls.append("linear_gelu")
            return super().linear_gelu(*a)

        def cross_entropy(self, *a):
            calls.append("cross_entropy")
            return super().cross_entropy(*a)

    reg = load_registry([("counting", types.SimpleNamespace(
        register_layer_kernels=hookimpl(lambda: Counting)))])
    assert select(reg, "layer_kernels", "auto", KernelRequest()).name == "counting"
    model = small_model(reg, "auto")
    model(*batch())
    assert calls.count("layer_norm") == 5 and calls.count("linear_gelu") == 2
    assert calls.count("cross_entropy") == 1


def test_named_kernels_that_cannot_run_are_errors(registry):
    with pytest.raises(UnknownComponentError, match=r"unknown layer kernels 'nope'; "
                                                    r"available: auto, native, torch"):
        select(registry, "layer_kernels", "nope", KernelRequest())
    with pytest.raises(BackendNotSupportedError) as e:
        select(registry, "layer_kernels", "native", KernelRequest(device="mps"))
    assert str(e.value).splitlines() == [
        "layer kernels 'native' cannot run this request; pick another with --kernels (see "
        "`gpt backends`)",
        "  request: device mps, float32",
        "  native: device 'mps' not supported (supports: cpu, cuda)"]


def test_cli_lists_and_takes_layer_kernels(registry, tmp_path):
    cli = build_cli(registry)
    r = CliRunner().invoke(cli, ["backends"], catch_exceptions=False)
    assert "layer kernels (--kernels; device cpu, float32):" in r.output
    assert "native     priority  60  available: yes  <- auto" in r.output
    assert "--kernels NAME" in CliRunner().invoke(cli, ["run", "--help"]).output
    data = tmp_path / "t.txt"
    data.write_text("Natasha laughed and Pierre smiled. " * 40)
    r = CliRunner().invoke(cli, ["run", "--preset", "tiny", "--data", str(data), "--iters", "2",
                                 "--block-size", "8", "--kernels", "nope", "--out-dir",
                                 str(tmp_path / "o")])
    assert r.exit_code != 0
    assert "Error: unknown layer kernels 'nope'; available: auto, native, torch" in r.output


def test_a_resumed_run_keeps_its_layer_kernels(registry, tmp_path):
    from gptlab.core.checkpoint import load_checkpoint
    from gptlab.core.trainer import Trainer

    text = "Natasha laughed and Pierre smiled. " * 40
    mc, tc = resolve_configs("tiny", {"block_size": 8}, {"max_iters": 2, "eval_iters": 1,
                                                         "final_eval_iters": 1})
    Trainer(registry, mc, tc, text, out_dir=tmp_path / "run").fit()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.metrics["kernels"] == "native"  # auto, recorded
    assert Trainer(registry, mc, tc, text, resume=ckpt).plan.kernels_name == "native"
    del ckpt.metrics["kernels"]  # a checkpoint from before layer kernels: the formulas
    assert Trainer(registry, mc, tc, text, resume=ckpt).plan.kernels_name == "torch"


def test_sample_and_eval_take_kernels(registry):
    cli = build_cli(registry)
    for command in ("sample", "eval"):
        assert "--kernels NAME" in CliRunner().invoke(cli, [command, "--help"]).output


def test_native_kernels_rank_below_torch_on_cuda_until_measured(registry, monkeypatch):
    """The native CUDA layer kernels have never run on a GPU: on CUDA, auto takes torch's and
    `gpt backends` says why; named, they still run; on the CPU (measured) they stay first. CUDA
    is made available here by fakes (no GPU, no build)."""
    from gptlab.core import selection
    from gptlab.plugins.cuda_kernels.layer_kernels import NativeKernels

    monkeypatch.setattr(selection, "device_unavailable_reason", lambda device: None)
    monkeypatch.setattr(NativeKernels, "unavailable_reasons", classmethod(lambda cls, d: []))
    monkeypatch.setattr(NativeKernels, "prepare", classmethod(lambda cls, request: None))
    cuda = KernelRequest(device="cuda")
    assert select(registry, "layer_kernels", "auto", cuda).name == "torch"
    assert select(registry, "layer_kernels", "native", cuda) is NativeKernels
    assert select(registry, "layer_kernels", "auto", KernelRequest(device="cpu")).name == "native"
    out = CliRunner().invoke(build_cli(registry), ["backends", "--device", "cuda"]).output
    table = out.split("layer kernels (--kernels; device cuda, float32):\n")[1].splitlines()
    assert table[0].startswith("torch      priority  10  available: yes  <- auto")
    native = table.index(next(ln for ln in table if ln.startswith("native ")))
    assert table[native].startswith("native     priority   5  available: yes")
    assert table[native + 2] == (
        "    note: below torch (10) on cuda: never run on a GPU yet; `gpt kernels gpucheck` "
        "measures them, `--kernels native` runs them")
