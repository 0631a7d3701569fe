"""The README and docs/ stay true to the repository.

- every relative link in README.md and docs/*.md names a file or folder that exists, and a
  ``#anchor`` names a heading of its file (GitHub's slugs);
- every ``gpt ...`` command they quote (inline code, code blocks, ``$ gpt ...`` prompts,
  ``python -m gptlab ...`` and ``torchrun ... -m gptlab ...``) names a command path of today's
  CLI: ``gpt PATH --help`` succeeds for its leading subcommand words;
- the README is a page, not a manual: at most 300 lines.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gptlab.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300


# --------------------------------------------------------------------------- markdown parsing
FENCE = re.compile(r"^\s*(```+|~~~+)")
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def split_markdown(text: str) -> tuple[str, list[str]]:
    """``(prose, code_lines)``: the text with fenced code blocks blanked (line numbers kept),
    and the lines of those blocks."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * 3
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            fence = None
            prose.append("")
        elif fence is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


def inline_code(prose: str) -> list[str]:
    """The contents of the inline code spans of ``prose`` (a span may wrap a line)."""
    return [" ".join(m.group(2).split()) for m in INLINE_CODE.finditer(prose)]


def without_inline_code(prose: str) -> str:
    """``prose`` with every inline code span blanked, so that no link is found inside one."""
    return INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)


def links(text: str) -> list[str]:
    """Targets of the inline links, images and reference definitions outside code."""
    prose = without_inline_code(split_markdown(text)[0])
    return [m.group(1) for m in LINK.finditer(prose)] + \
        [m.group(1) for m in REFERENCE.finditer(prose)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and code unwrapped) lower-cased, every
    character but letters, digits, ``_``, ``-`` and spaces dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text, repeated slugs numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in split_markdown(text)[0].splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


GPT = re.compile(r"(?<![\w./$-])gpt(?![\w./-])|(?<![\w./-])-m\s+gptlab(?![\w./-])")
WORD = re.compile(r"[a-z][a-z0-9_-]*")


def command_words(text: str) -> list[list[str]]:
    """For each ``gpt`` (or ``-m gptlab``) in a command line, the words that follow it up to
    the first option, argument that is not a plain word, or end of the command (``;``, ``|``,
    ``&&``, ``#``, a closing parenthesis or quote). ``gptlab``, ``nanogpt`` or ``gpt.py`` are
    not ``gpt``; ``python -m gptlab.verify...`` is a module, not the CLI."""
    found = []
    for m in GPT.finditer(text):
        words = []
        for token in text[m.end():].split("\n", 1)[0].split():
            end = re.search(r"[;|&#)`'\"]", token)
            word = token if end is None else token[:end.start()]
            if not WORD.fullmatch(word):
                break
            words.append(word)
            if end is not None:
                break
        found.append(words)
    return found


def command_lines(text: str) -> list[str]:
    """The places a command may be quoted: inline code spans, and code-block lines (a line
    ending in ``\\`` joined with the next)."""
    prose, code = split_markdown(text)
    lines, pending = [], ""
    for line in code:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return inline_code(prose) + lines


def command_path(cli: click.Group, words: list[str]) -> tuple[str, ...]:
    """The leading subcommand words of ``gpt WORDS...``: while the command reached is a group,
    the next word must be one of its subcommands (kept even if it is not, so that its --help
    fails); a command's own arguments are not part of the path."""
    path, group = [], cli
    for word in words:
        if not isinstance(group, click.Group):
            break
        path.append(word)
        group = group.commands.get(word)
        if group is None:
            break
    return tuple(path)


# --------------------------------------------------------------------------- the parser's own checks
def test_command_words_find_gpt_commands_only():
    text = ("$ gpt bench train --variants float32 --peer model.py\n"
            "torchrun --standalone --nproc-per-node=2 -m gptlab run --preset tiny\n"
            "pip install gptlab; python -m gptlab.verify.gpucheck.smoke; nanogpt's gpt.py\n"
            "gpt sample out --prompt x && gpt kernels gpucheck  # then gpt eval out\n"
            "gpt kernels check`")
    assert command_words(text) == [["bench", "train"], ["run"], ["sample", "out"],
                                   ["kernels", "gpucheck"], ["eval", "out"],
                                   ["kernels", "check"]]


def test_command_path_stops_at_a_commands_arguments(cli):
    assert command_path(cli, ["sample", "out"]) == ("sample",)
    assert command_path(cli, ["bench", "generate", "out"]) == ("bench", "generate")
    assert command_path(cli, ["kernels", "bench-ops", "x"]) == ("kernels", "bench-ops")
    assert CliRunner().invoke(cli, ["kernels", "bench-ops", "--help"]).exit_code != 0


def test_links_and_slugs():
    text = ("# The `gpt` command: a page\n## Training at scale (DDP)\n## Notes\n## Notes\n"
            "See [a](docs/a.md#x), ![img](b.png), `[c](not/a/link.md)` and [d][d].\n"
            "```\n[e](in/code.md)\n```\n[d]: docs/d.md\n")
    assert links(text) == ["docs/a.md#x", "b.png", "docs/d.md"]
    assert anchors(text) == {"the-gpt-command-a-page", "training-at-scale-ddp", "notes",
                             "notes-1"}


# --------------------------------------------------------------------------- the docs
@pytest.fixture(scope="module")
def cli():
    return build_cli()


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_docs_exist():
    assert (ROOT / "docs").is_dir() and len(DOCS) > 1


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = doc if not path else (doc.parent / path)
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{_doc_id(doc)}:\n  " + "\n  ".join(broken)


def _quoted_commands() -> list[tuple[str, list[str]]]:
    out = []
    for doc in DOCS:
        for line in command_lines(doc.read_text()):
            out += [(_doc_id(doc), words) for words in command_words(line)]
    return out


def test_docs_quote_gpt_commands():
    assert any(words for _, words in _quoted_commands())


def test_every_quoted_gpt_command_exists(cli):
    paths: dict[tuple[str, ...], set[str]] = {}
    for doc, words in _quoted_commands():
        paths.setdefault(command_path(cli, words), set()).add(doc)
    runner = CliRunner()
    bad = []
    for path, where in sorted(paths.items()):
        result = runner.invoke(cli, [*path, "--help"])
        if result.exit_code != 0:
            bad.append(f"gpt {' '.join(path)} (in {', '.join(sorted(where))}): "
                       f"{result.output.strip().splitlines()[-1:]}")
    assert not bad, "\n".join(bad)


def test_readme_is_a_page():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
