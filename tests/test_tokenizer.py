import pytest

from gptlab.core.errors import TokenizerError
from gptlab.plugins.tokenizers.char import CharTokenizer


def test_round_trip_and_sorted_vocab():
    tok = CharTokenizer()
    tok.train("hello world")
    assert tok.vocab_size == 8
    assert tok.chars == sorted(set("hello world"))
    ids = tok.encode("hello")
    assert ids == [tok.chars.index(c) for c in "hello"]
    assert tok.decode(ids) == "hello"
    assert tok.decode([]) == ""


def test_war_and_peace_has_111_symbols_and_round_trips(war_and_peace):
    text = war_and_peace.read_text(encoding="utf-8")
    tok = CharTokenizer()
    tok.train(text)
    assert tok.vocab_size == 111
    sample = text[100_000:110_000]
    assert tok.decode(tok.encode(sample)) == sample


def test_unknown_character_is_a_clear_error():
    tok = CharTokenizer()
    tok.train("abc")
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A LATIN SMALL LETTER Z\) at position 2"):
        tok.encode("abz")


def test_bad_ids_and_untrained():
    tok = CharTokenizer()
    with pytest.raises(TokenizerError, match="not trained"):
        tok.encode("a")
    tok.train("ab")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([0, 5])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer().train("")


def test_state_round_trip():
    tok = CharTokenizer()
    tok.train("War and Peace — “Well, Prince”")
    again = CharTokenizer.from_state(tok.state_dict())
    assert again.chars == tok.chars
    assert again.encode("Peace") == tok.encode("Peace")
