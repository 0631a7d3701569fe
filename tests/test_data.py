"""Corpus resolution, download with integrity check, and input validation."""

import hashlib

import pytest

from gptlab.core.errors import DataError
from gptlab.data import corpora
from gptlab.data.batches import encode_splits
from gptlab.data.corpora import Corpus, load_text, resolve_corpus, split_ids
from gptlab.plugins.tokenizers.char import CharTokenizer

TEXT = "Well, Prince, so Genoa and Lucca are now just family estates.\n" * 20


def fake_corpus(tmp_path, served: bytes, expected_text: str, url=None) -> Corpus:
    src = tmp_path / "served.txt"
    src.write_bytes(served)
    return Corpus(name="war_and_peace", filename="war_and_peace.txt",
                  url=url or src.as_uri(),
                  sha256=hashlib.sha256(expected_text.encode()).hexdigest())


def test_download_normalises_checks_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    served = b"\xef\xbb\xbf" + TEXT.replace("\n", "\r\n").encode()  # as Gutenberg serves it
    corpus = fake_corpus(tmp_path, served, TEXT)
    seen = []
    path = resolve_corpus(corpus=corpus, progress=lambda done, total: seen.append(done))
    assert path == tmp_path / "cache" / "gptlab" / "war_and_peace.txt"
    assert path.read_text() == TEXT
    assert seen and seen[-1] == len(served)
    assert not list(path.parent.glob("*.part"))
    # second call: cached, no download
    (tmp_path / "served.txt").unlink()
    assert resolve_corpus(corpus=corpus) == path


def test_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = fake_corpus(tmp_path, b"something else", TEXT)
    with pytest.raises(DataError, match="sha256.*--data PATH"):
        resolve_corpus(corpus=corpus)
    assert not (tmp_path / "cache" / "gptlab" / "war_and_peace.txt").exists()


def test_offline_without_a_copy_says_how_to_point_at_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = fake_corpus(tmp_path, b"", TEXT, url="http://127.0.0.1:9/pg2600.txt")
    with pytest.raises(DataError) as e:
        resolve_corpus(corpus=corpus)
    msg = str(e.value)
    assert "could not download" in msg and "--data PATH" in msg and "GPTLAB_DATA_DIR" in msg


def test_data_dir_env_and_explicit_paths(tmp_path, monkeypatch):
    (tmp_path / "war_and_peace.txt").write_text(TEXT)
    mine = Corpus("war_and_peace", "war_and_peace.txt", "http://x",
                  sha256=hashlib.sha256(TEXT.encode()).hexdigest())
    monkeypatch.setitem(corpora.CORPORA, "war_and_peace", mine)
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(tmp_path))
    assert resolve_corpus(corpus=mine) == tmp_path / "war_and_peace.txt"
    assert resolve_corpus("war_and_peace") == tmp_path / "war_and_peace.txt"
    with pytest.raises(DataError, match="is not war_and_peace: its sha256 is "):
        resolve_corpus()  # the real War and Peace's hash: this file is not it
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="has no war_and_peace.txt"):
        resolve_corpus()
    other = tmp_path / "mine.txt"
    other.write_text("hello")
    assert resolve_corpus(str(other)) == other
    with pytest.raises(DataError, match="does not exist"):
        resolve_corpus(str(tmp_path / "missing.txt"))


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 \(invalid byte 0xe9 at offset 3\)"):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfabc")
    assert load_text(tmp_path / "bom.txt") == "abc"
    with pytest.raises(DataError, match="cannot read"):
        load_text(tmp_path)


def test_too_short_text_is_a_clear_error():
    tok = CharTokenizer()
    tok.train("abcdefghij" * 3)
    with pytest.raises(DataError, match="val split has 3 tokens.*--block-size"):
        encode_splits("abcdefghij" * 3, tok, 0.1, block_size=8)


def test_war_and_peace_split_matches_the_seed(war_and_peace):
    text = load_text(war_and_peace)
    assert len(text) == 3_227_518
    assert hashlib.sha256(text.encode()).hexdigest() == corpora.WAR_AND_PEACE.sha256
    n = split_ids(len(text), 0.1)
    assert (n, len(text) - n) == (2_904_766, 322_752)
