"""The data layer: corpora, tokenizers, tokenised datasets and batches."""

from tritlm.data.corpus import corpus_files, default_corpus_path, read_corpus
from tritlm.data.loader import TokenData
from tritlm.data.prepare import DatasetMeta, prepare_dataset, token_dtype
from tritlm.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    train_bpe,
)
from tritlm.data.tokenizer_load import build_tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "DatasetMeta",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TokenData",
    "Tokenizer",
    "build_tokenizer",
    "corpus_files",
    "default_corpus_path",
    "load_tokenizer",
    "prepare_dataset",
    "read_corpus",
    "token_dtype",
    "train_bpe",
]
