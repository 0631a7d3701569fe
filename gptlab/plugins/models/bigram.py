"""Bigram language model: the next character's logits are read straight from a table row.

The baseline of the seed: the table is a (vocab, vocab) embedding, so row ``i`` holds the
log-probabilities (up to a constant) of every character following character ``i``. Its best
possible val loss on War and Peace is the conditional entropy of the val bigrams, 2.475 nats.
"""

import torch.nn as nn

from gptlab import LanguageModel


class BigramLanguageModel(LanguageModel):
    name = "bigram"
    description = "logits from a (vocab x vocab) embedding table; no context beyond one char"
    uses_attention = False

    def __init__(self, config, components):
        super().__init__(config, components)
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)  # (B, T, vocab)
        return logits, self.loss(logits, targets)
