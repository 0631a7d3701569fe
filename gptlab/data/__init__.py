"""Data: corpora (War and Peace, downloaded and checked; any UTF-8 file) in
:mod:`gptlab.data.corpora`, and batches for training in :mod:`gptlab.data.batches`."""

from gptlab.data.corpora import (CORPORA, WAR_AND_PEACE, Corpus, load_text, resolve_corpus,
                                 split_ids)

__all__ = ["CORPORA", "WAR_AND_PEACE", "Corpus", "load_text", "resolve_corpus", "split_ids"]
