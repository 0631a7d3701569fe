"""Named corpora, their download and integrity check, and loading of any UTF-8 text file.

War and Peace is Project Gutenberg ebook #2600. The download is normalised (byte-order mark
removed, CRLF -> LF) and its SHA-256 checked against the copy this project was measured on, then
moved into place atomically; a copy found later (in the cache or ``$GPTLAB_DATA_DIR``) is
hashed again each time it is used, so a damaged copy or another file of that name is an error,
never trained on silently. Where files are looked for, in order:

1. ``--data PATH`` (any UTF-8 text file; no checksum);
2. the folder in ``$GPTLAB_DATA_DIR`` (CI points it at a shared copy);
3. the cache folder ``$XDG_CACHE_HOME/gptlab`` (``~/.cache/gptlab``), downloading if missing.

Every text is read the same way (:func:`load_text`): UTF-8, a leading byte-order mark dropped,
Windows line ends (CRLF) turned into ``\n``, so a file saved on Windows trains like the
download (and has no ``\r`` token).

Library code never prints: downloads report progress through a ``progress(done, total)``
callback supplied by the caller.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import attrs

from gptlab.core.errors import DataError
from gptlab.core.files import atomic_write
from gptlab.core.paths import DATA_DIR_ENV, cache_dir, data_dir

Progress = Callable[[int, int | None], None]


@attrs.frozen
class Corpus:
    name: str
    filename: str
    url: str
    sha256: str  # of the normalised UTF-8 text
    description: str = ""


WAR_AND_PEACE = Corpus(
    name="war_and_peace",
    filename="war_and_peace.txt",
    url="https://www.gutenberg.org/cache/epub/2600/pg2600.txt",
    sha256="7443fdc978a9f769928898ea75db4096f755fd6972f4b133ca1fcba072eb0c80",
    description="Leo Tolstoy, War and Peace (Project Gutenberg #2600), 3,227,518 chars",
)
CORPORA = {WAR_AND_PEACE.name: WAR_AND_PEACE}


def _normalise(raw: bytes) -> bytes:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.replace(b"\r\n", b"\n")


def download(corpus: Corpus, dest: Path, progress: Progress | None = None,
             timeout: float = 30.0) -> Path:
    """Fetch ``corpus.url``, normalise, verify the checksum, and write ``dest`` atomically."""
    try:
        with urllib.request.urlopen(corpus.url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            chunks, done = [], 0
            while chunk := resp.read(1 << 16):
                chunks.append(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"could not download {corpus.name} from {corpus.url} ({reason}); download it "
            f"yourself and pass --data PATH, or set {DATA_DIR_ENV} to a folder holding "
            f"{corpus.filename}"
        ) from None
    data = _normalise(b"".join(chunks))
    digest = hashlib.sha256(data).hexdigest()
    if digest != corpus.sha256:
        raise DataError(
            f"downloaded {corpus.name} has sha256 {digest[:12]}..., expected "
            f"{corpus.sha256[:12]}... (the upstream file changed?); pass --data PATH to train "
            f"on it anyway"
        )
    return atomic_write(dest, data)


def resolve_corpus(data: str | os.PathLike | None = None, *, corpus: Corpus = WAR_AND_PEACE,
                   download_missing: bool = True, progress: Progress | None = None) -> Path:
    """Return the path of the text to train on (see the module docstring for the search order)."""
    if data is not None and str(data) not in CORPORA:
        path = Path(data).expanduser()
        if path.is_dir():
            raise DataError(f"data path {str(path)!r} is a folder; pass --data with the path of "
                            f"a UTF-8 text file")
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist; pass --data with the path "
                            f"of a UTF-8 text file, or one of: {', '.join(CORPORA)}")
        return path
    if data is not None:
        corpus = CORPORA[str(data)]
    folder = data_dir()
    if folder is not None:
        path = folder / corpus.filename
        if not path.is_file():
            raise DataError(f"{DATA_DIR_ENV}={folder} has no {corpus.filename}; put the file "
                            f"there or unset {DATA_DIR_ENV} to download it")
        return verify(corpus, path, fix=f"replace it with the text of {corpus.url}")
    path = cache_dir() / corpus.filename
    if path.is_file():
        return verify(corpus, path, fix="delete it to download it again")
    if not download_missing:
        raise DataError(f"{corpus.name} is not in {path.parent}; run without --no-download, pass "
                        f"--data PATH, or set {DATA_DIR_ENV}")
    return download(corpus, path, progress)


def verify(corpus: Corpus, path: Path, *, fix: str) -> Path:
    """``path`` if its normalised content has ``corpus.sha256``, else a DataError saying ``fix``
    (or how to train on the file anyway)."""
    try:
        digest = hashlib.sha256(_normalise(path.read_bytes())).hexdigest()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if digest != corpus.sha256:
        raise DataError(f"{path} is not {corpus.name}: its sha256 is {digest[:12]}..., expected "
                        f"{corpus.sha256[:12]}... (damaged, or another file of that name); "
                        f"{fix}, or pass it with --data PATH to train on it anyway")
    return path


def text_sha256(text: str) -> str:
    """The SHA-256 of a text as :func:`load_text` returns it (what a checkpoint records)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_same_text(text: str, sha256: str | None, source: str | None, *, name: str,
                    fix: str) -> None:
    """A DataError unless ``text`` has the SHA-256 a run recorded (``sha256``, of its text at
    ``source``); ``name`` is how the message calls ``text``, ``fix`` what it tells to do."""
    sha = text_sha256(text)
    if sha256 is not None and sha != sha256:
        raise DataError(f"{name} is not the text this run was trained on (sha256 {sha[:12]}..., "
                        f"the run's {sha256[:12]}... from {source}); {fix}")


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file (BOM dropped, CRLF -> LF); a clear :class:`DataError` for missing,
    non-UTF-8 or empty files."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {str(path)!r}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(path)!r} is not UTF-8 (invalid byte 0x{raw[e.start]:02x}"
                        f" at offset {e.start}); convert it, e.g. iconv -t utf-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\r\n", "\n")  # Windows line ends, as the download is normalised
    if not text:
        raise DataError(f"data file {str(path)!r} is empty; pass a file with some text")
    return text


def split_ids(n: int, val_fraction: float) -> int:
    """Index where the val split starts: the first ``1 - val_fraction`` is train (as the seed)."""
    return int(n * (1.0 - val_fraction))
