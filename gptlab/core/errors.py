"""Typed errors of gptlab.

Every error a user can cause derives from :class:`GptlabError` and carries a one-line message
that says what is wrong and how to fix it. The CLI prints that line (no traceback) and exits 1.
"""


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


def first_line(text: str, limit: int = 160) -> str:
    """The first non-empty line of ``text``, cut at a word boundary to at most ``limit``
    characters (with "..."), for quoting another library's message in a one-line error."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line
    cut = line[:limit - 3].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + "..."
