"""Typed errors of gptlab, and how their messages quote what they did not write.

Every error a user can cause derives from :class:`GptlabError` and carries a one-line message
that says what is wrong and how to fix it. The CLI prints that line (no traceback) and exits 1.
Messages quote strings gptlab did not write (a checkpoint's fields, plugin names, paths):
:func:`printable` is the one filter every line the CLI prints goes through, so a control
character in them (an escape code that would forge an ``Error:`` line or recolour the terminal)
is shown escaped, as Python's ``repr`` shows it; :func:`command` quotes a suggested command for
the shell, so that it can be pasted as it is shown.
"""

import shlex


class GptlabError(Exception):
    """Base class: a user-facing error with a one-line message naming the fix."""


class ConfigError(GptlabError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class DataError(GptlabError):
    """A corpus is missing, unreadable, not UTF-8, empty or too short."""


class TokenizerError(GptlabError, ValueError):
    """Text cannot be encoded (unknown character) or ids cannot be decoded."""


class PluginError(GptlabError):
    """A plugin conflicts with another one or registered something malformed."""


class UnknownComponentError(GptlabError, LookupError):
    """A tokenizer, model, block or attention backend name that no plugin registered."""


class BackendNotSupportedError(GptlabError):
    """An explicitly chosen attention backend cannot run the request; the message lists why."""


class CheckpointError(GptlabError):
    """A checkpoint file is missing, truncated or not a gptlab checkpoint."""


class DeviceError(GptlabError):
    """The requested device is not available."""


class RunFolderError(GptlabError):
    """A run folder already holds a run, is in use by another run, or cannot be written."""


class TrainingDiverged(GptlabError):
    """The loss or the weights stopped being finite; nothing non-finite was saved."""


class OutOfMemory(GptlabError):
    """A run needs more memory than the machine has."""


class Interrupted(GptlabError):
    """Ctrl-C where there was nothing to save first (training saves, then raises its own
    ``TrainingInterrupted``); the shell's code for SIGINT."""

    exit_code = 130


def first_line(text: str, limit: int = 160) -> str:
    """The first non-empty line of ``text``, cut at a word boundary to at most ``limit``
    characters (with "..."), for quoting another library's message in a one-line error."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line
    cut = line[:limit - 3].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + "..."


def printable(text: str, keep: str = "\n") -> str:
    """``text`` with every character that ``str.isprintable`` rejects (control characters,
    escape codes, bidirectional overrides, lone surrogates) shown escaped as ``repr`` shows it
    (``\\x1b``), except those in ``keep`` (the newline of a message of several lines)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else _escaped(c) for c in text)


_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def command(*words) -> str:
    """A suggested ``gpt`` command, each word quoted for the shell where it needs it
    (``gpt run --resume 'my run'``)."""
    return " ".join(["gpt", *(shlex.quote(str(w)) for w in words)])
