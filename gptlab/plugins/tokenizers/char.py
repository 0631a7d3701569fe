"""Character-level tokenizer: one id per distinct character of the training text.

On War and Peace the vocabulary has 111 symbols. Ids follow the sorted order of the characters,
so the same text always gives the same vocabulary.
"""

from __future__ import annotations

import unicodedata

from gptlab import Tokenizer, hookimpl
from gptlab.core.errors import TokenizerError


def _describe(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"{ch!r} (U+{ord(ch):04X}{' ' + name if name else ''})"


class CharTokenizer(Tokenizer):
    name = "char"

    def __init__(self, chars: list[str] | None = None):
        self._itos: list[str] = []
        self._stoi: dict[str, int] = {}
        if chars is not None:
            self._set_vocab(chars)

    def _set_vocab(self, chars):
        if len(set(chars)) != len(chars):
            raise TokenizerError("char tokenizer vocabulary has duplicate characters")
        self._itos = list(chars)
        self._stoi = {c: i for i, c in enumerate(self._itos)}

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def chars(self) -> list[str]:
        return list(self._itos)

    def train(self, text: str) -> None:
        if not text:
            raise TokenizerError("cannot train the char tokenizer on empty text")
        self._set_vocab(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            if not self._itos:
                raise TokenizerError("char tokenizer is not trained; call train(text) first") from None
            ch = e.args[0]
            raise TokenizerError(
                f"character {_describe(ch)} at position {text.index(ch)} is not in the "
                f"tokenizer's vocabulary of {self.vocab_size} characters; remove it from the text"
            ) from None

    def decode(self, ids) -> str:
        itos, n, out = self._itos, len(self._itos), []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0..{n - 1})")
            out.append(itos[i])
        return "".join(out)

    def state_dict(self) -> dict:
        return {"chars": "".join(self._itos)}

    @classmethod
    def from_state(cls, state: dict) -> CharTokenizer:
        chars = state.get("chars") if isinstance(state, dict) else None
        if not isinstance(chars, str) or not chars:
            raise TokenizerError("a char tokenizer state holds its characters as one non-empty "
                                 "string under 'chars'")
        try:
            chars.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text holds one
            raise TokenizerError("a char tokenizer state holds a character no UTF-8 text "
                                 "has") from None
        return cls(list(chars))


@hookimpl
def register_tokenizers():
    return CharTokenizer
