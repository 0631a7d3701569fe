"""Faulty third-party plugins: each is one problem line naming it, shown once per command, and
the built-ins keep working."""

import logging
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import make_dist, write_module
from gptlab.cli import build_cli
from gptlab.core.attention import AttentionRequest
from gptlab.core.planning import build_model, choose_components
from gptlab.core.config import ModelConfig
from gptlab.core.selection import select
from gptlab.core.errors import BackendNotSupportedError
from gptlab.core.plugins import load_registry

BUILTINS = {"char", "models", "attention", "cuda_kernels"}

RUN_COMMAND = """
    import click
    from gptlab import hookimpl
    @hookimpl
    def register_commands(cli):
        @cli.command("{name}")
        def hijack():
            click.echo("hijacked by {mod}")
"""

BAD_BACKENDS = """
    from gptlab import AttentionBackend, hookimpl
    class BadReasons(AttentionBackend):
        name, priority = "badreasons", 1000
        @classmethod
        def not_supported_reasons(cls, request):
            raise RuntimeError("boom")
    class BadPrepare(AttentionBackend):
        name, priority = "badprepare", 999
        @classmethod
        def prepare(cls, request):
            raise RuntimeError("no compiler")
    @hookimpl
    def register_attention_backends():
        return [BadReasons, BadPrepare]
"""


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist, entry_points, {module: source})``: a distribution as pip leaves it,
    first on sys.path (so its entry points come before gptlab's own)."""
    modules = []

    def install(dist, entry_points, sources):
        site = make_dist(tmp_path, dist, entry_points)
        for mod, src in sources.items():
            write_module(site, mod, src)
            modules.append(mod)
        monkeypatch.syspath_prepend(str(site))

    yield install
    for mod in modules:  # the next test writes another module under the same name
        sys.modules.pop(mod, None)


def assert_builtins_intact(reg):
    sources = {p.name: p.source for p in reg.plugins}
    assert all("(gptlab " in sources[name] for name in BUILTINS)
    assert {"bigram", "transformer"} <= set(reg.models)


def assert_shown_once_per_command(reg, problem, caplog):
    """`gpt plugins` lists ``problem`` once (stdout, nothing logged); any other command warns
    once on stderr; `gpt backends` and `gpt run --help` are still gptlab's."""
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(build_cli(reg), ["plugins"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count(problem) == 1 and result.stderr == "" and caplog.text == ""
    result = CliRunner().invoke(build_cli(reg), ["backends"])
    assert result.exit_code == 0 and "sdpa" in result.stdout
    assert result.stderr.splitlines().count(f"WARNING: {problem}") == 1
    assert result.stdout.count(problem) == 0
    result = CliRunner().invoke(build_cli(reg), ["run", "--help"])
    assert result.exit_code == 0 and "--preset" in result.stdout
    assert "hijacked" not in result.output


@pytest.mark.parametrize("entry_points, source, problem", [
    ({"x": "x_mod"}, "import sys\nsys.exit(3)\n",
     "plugin 'x' (x_mod (x-dist 0.1.0)) failed to import: SystemExit: 3"),
    ({"x": "x_mod"}, "raise SystemExit\n",
     "plugin 'x' (x_mod (x-dist 0.1.0)) failed to import: SystemExit"),
    ({"x": "x_mod"}, """
        import sys
        from gptlab import hookimpl
        @hookimpl
        def register_models():
            sys.exit("no models today")
     """, "plugin 'x': register_models() raised SystemExit: no models today"),
    ({"x": "x_mod"}, """
        import sys
        from gptlab import hookimpl
        @hookimpl
        def register_commands(cli):
            sys.exit(1)
     """, "plugin 'x': register_commands() raised SystemExit: 1"),
    ({"x": "x_mod"}, RUN_COMMAND.format(name="run", mod="x"),
     "plugin 'x': command 'run' is already gptlab's own; ignored"),
    ({"x": "x_mod"}, RUN_COMMAND.format(name="kernels", mod="x"),
     "plugin 'x': command 'kernels' is already registered by plugin 'cuda_kernels'; ignored"),
    ({"models": "x_mod"}, "raise RuntimeError('never imported')\n",
     "plugin 'models' (x_mod (x-dist 0.1.0)) skipped: the name is already taken by gptlab's "
     "own plugin"),
], ids=["import-exit-3", "import-exit", "hook-exit", "commands-exit", "command-run",
        "command-of-builtin-plugin", "name-of-builtin"])
def test_faulty_plugin_is_one_problem_and_builtins_stay(install, caplog, entry_points, source,
                                                        problem):
    install("x-dist", entry_points, {"x_mod": source})
    reg = load_registry()
    build_cli(reg)  # command problems are met here
    assert reg.problems == [problem]
    assert_builtins_intact(reg)
    assert_shown_once_per_command(reg, problem, caplog)


def test_second_plugin_with_a_taken_entry_point_or_command_name_is_refused(install, caplog):
    install("y-dist", {"dup": "y_mod"}, {"y_mod": RUN_COMMAND.format(name="hello", mod="y")})
    install("x-dist", {"dup": "x_mod", "x": "x2_mod"},  # first on sys.path: loaded first
            {"x_mod": "", "x2_mod": RUN_COMMAND.format(name="hello", mod="x")})
    install("z-dist", {"z": "z_mod"}, {"z_mod": RUN_COMMAND.format(name="hello", mod="z")})
    reg = load_registry()
    cli = build_cli(reg)
    skipped = ("plugin 'dup' (y_mod (y-dist 0.1.0)) skipped: the name is already taken by "
               "x_mod (x-dist 0.1.0)")
    taken = "plugin 'x': command 'hello' is already registered by plugin 'z'; ignored"
    assert reg.problems == [skipped, taken]
    assert CliRunner().invoke(cli, ["hello"]).stdout == "hijacked by z\n"
    assert {p.name: p.registered for p in reg.plugins}["z"] == {"command": ["hello"]}
    for problem in reg.problems:
        assert_shown_once_per_command(reg, problem, caplog)


def test_ctrl_c_while_importing_a_plugin_is_not_swallowed(install):
    install("x-dist", {"x": "x_mod"}, {"x_mod": "raise KeyboardInterrupt\n"})
    with pytest.raises(KeyboardInterrupt):
        load_registry()


@pytest.fixture
def bad_backends(install):
    install("x-dist", {"x": "x_mod"}, {"x_mod": BAD_BACKENDS})
    return load_registry()


def test_backends_whose_classmethods_raise_are_listed_and_passed_over(bad_backends, tmp_path):
    reg = bad_backends
    result = CliRunner().invoke(build_cli(reg), ["backends"])
    assert result.exit_code == 0 and "sdpa" in result.stdout
    assert "    - not_supported_reasons() raised RuntimeError: boom\n" in result.stdout
    req = AttentionRequest(head_dim=16)
    assert select(reg, "attention_backends", "auto", req).name not in {"badreasons", "badprepare"}
    for name, reason in [("badreasons", "not_supported_reasons() raised RuntimeError: boom"),
                         ("badprepare", "prepare() raised RuntimeError: no compiler")]:
        with pytest.raises(BackendNotSupportedError) as e:
            select(reg, "attention_backends", name, req)
        assert str(e.value).splitlines()[-1] == f"  {name}: {reason}"
        result = CliRunner().invoke(build_cli(reg), [
            "run", "--preset", "tiny", "--attention", name, "--out-dir", str(tmp_path)])
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [
            f"Error: attention backend {name!r} cannot run this request; pick another with "
            f"--attention (see `gpt backends`)",
            "  request: device cpu, float32, head_dim 24, q_len 64, k_len 64, causal, "
            "with backward",
            f"  {name}: {reason}"]


def test_call_time_check_and_kv_cache_survive_raising_reasons(bad_backends):
    cls = bad_backends.attention_backend("badreasons")
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(BackendNotSupportedError) as e:
        cls()(q, q, q)
    assert str(e.value).endswith("  badreasons: not_supported_reasons() raised RuntimeError: boom")
    config = ModelConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8)
    model = build_model(bad_backends, config, components=choose_components(
        bad_backends, config, attention=cls()))
    assert type(model.attention_backend) is cls and not model.kv_cache_usable()


BROKEN_NORM = """
    from gptlab import Norm, hookimpl
    class Broken(Norm):
        name = "broken"
        def __init__(self, dim, bias=True):
            super().__init__()
            raise TypeError("Broken() needs a 'scale' argument")
    @hookimpl
    def register_norms():
        return [Broken]
"""


def test_a_plugin_part_that_cannot_be_built_is_one_line_naming_it(install, war_and_peace,
                                                                  tmp_path):
    install("x-dist", {"x": "x_mod"}, {"x_mod": BROKEN_NORM})
    reg = load_registry()
    assert reg.problems == []
    out = tmp_path / "run"
    result = CliRunner().invoke(build_cli(reg), [
        "run", "--preset", "tiny", "--iters", "1", "--norm", "broken", "--dtype", "float32",
        "--attention", "sdpa", "--data", str(war_and_peace), "--out-dir", str(out)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: plugin 'x': norm 'broken' failed while the model was built (TypeError: "
        "Broken() needs a 'scale' argument); fix the plugin, or choose another part")
    assert not out.exists() or not any(p.name.endswith(".pt") for p in out.iterdir())
    # gptlab's own bugs stay tracebacks: no plugin's file is on their way
    with pytest.raises(ZeroDivisionError):
        try:
            1 / 0
        except ZeroDivisionError as e:
            from gptlab.core.plugins import plugin_part_in
            assert plugin_part_in(reg, e) is None
            raise
