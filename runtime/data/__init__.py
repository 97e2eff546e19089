"""Corpora, tokenizers and the exactly resumable, globally positioned data loader."""
