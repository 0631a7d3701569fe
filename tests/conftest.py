import os
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.attention import AttentionRequest
from gptlab.core.plugins import load_registry
from gptlab.data.corpora import resolve_corpus

ROOT = Path(__file__).resolve().parents[1]

# `auto` takes the highest-priority backend in tests, so that what a test trains with does not
# depend on the machine's timings (tests/test_autotune.py covers the measured choice)
os.environ["GPTLAB_AUTO"] = "priority"
EXAMPLE_PLUGIN = ROOT / "examples" / "gptlab-example-plugin"

# a small text and a small run of it, for the CLI's fault and trust tests
TEXT = "Prince Andrew looked at Pierre. The old prince was silent, and Natasha laughed.\n" * 60
SMALL = ["--preset", "tiny", "--block-size", "16", "--n-embd", "32", "--n-head", "2",
         "--sample-tokens", "0", "--attention", "naive"]


def gpt(cli, *args):
    """``gpt ARGS...`` through click's runner; an exception gptlab did not turn into an error
    line fails the test."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    """The one `Error: ...` line (click usage errors print usage lines above it)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def war_and_peace_path() -> Path:
    """$GPTLAB_DATA_DIR (CI's shared copy), else ../shared/data beside the repo, else the
    user's cache (downloading War and Peace once, as `gpt run` would)."""
    env = os.environ.get("GPTLAB_DATA_DIR")
    if env:
        return Path(env) / "war_and_peace.txt"
    shared = ROOT.parent / "shared" / "data" / "war_and_peace.txt"
    return shared if shared.is_file() else resolve_corpus()


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture
def cli(registry):
    return build_cli(registry)


@pytest.fixture(scope="session")
def war_and_peace():
    path = war_and_peace_path()
    if not path.is_file():
        pytest.fail(f"War and Peace not found at {path}: set GPTLAB_DATA_DIR to the folder "
                    f"holding war_and_peace.txt")
    return path


def cpu_backend_names():
    reg = load_registry()
    req = AttentionRequest(device="cpu", dtype=torch.float32, head_dim=16, q_len=32, k_len=32)
    return sorted(n for n, cls in reg.attention_backends.items()
                  if not cls.not_supported_reasons(req))


def pytest_generate_tests(metafunc):
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", cpu_backend_names())


@pytest.fixture
def backend(registry, backend_name):
    return registry.attention_backend(backend_name)()


def make_dist(tmp_path: Path, dist: str, entry_points: dict[str, str]) -> Path:
    """Write a minimal installed-distribution record so importlib.metadata finds its entry
    points, exactly as pip would leave it; returns the folder to put on sys.path."""
    site = tmp_path / f"site-{dist}"
    info = site / f"{dist}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[gptlab]\n{eps}\n")
    return site


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
