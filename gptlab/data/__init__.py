"""Corpora: the named War and Peace corpus (downloaded and checked) and any UTF-8 text file."""

from gptlab.data.corpora import (CORPORA, WAR_AND_PEACE, Corpus, cache_dir, load_text,
                                 resolve_corpus, split_ids)

__all__ = ["CORPORA", "WAR_AND_PEACE", "Corpus", "cache_dir", "load_text", "resolve_corpus",
           "split_ids"]
