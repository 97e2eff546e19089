"""Corpora, tokenizers and the exactly resumable, globally positioned data loader."""

from stalwart.runtime.data.corpus import corpus_files, iter_documents, stdlib_sources
from stalwart.runtime.data.dataset import PackedDataset, TokenStream
from stalwart.runtime.data.loader import GlobalBatchLoader
from stalwart.runtime.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "GlobalBatchLoader",
    "HFTokenizer",
    "PackedDataset",
    "TokenStream",
    "Tokenizer",
    "build_tokenizer",
    "corpus_files",
    "iter_documents",
    "stdlib_sources",
]
