"""Data: the IMDb sentiment dataset, length-bucketed batching, and the WordPiece tokenizer."""

from fnlm.data._alignment import align_labels, encode_windows, encode_words, span_positions
from fnlm.data._batching import bucket_lengths, choose_buckets, make_batches, padding_efficiency
from fnlm.data._bpe import BPETokenizer, load_bpe_tokenizer
from fnlm.data._imdb import (
    IMDB_SHA256,
    IMDB_URL,
    DatasetError,
    DownloadError,
    IMDb,
    download_imdb,
    html_clean,
    load_imdb,
    load_imdb_splits,
    subset,
)
from fnlm.data._labelled import load_labelled_files, read_labelled_file
from fnlm.data._limits import MAX_TEXT_CHARS, TextTooLongError
from fnlm.data._nsp import NspPairs, nsp_pairs, split_sentences
from fnlm.data._ordered import length_sorted_batches, predict_in_order
from fnlm.data._packing import pack_rows, pack_sequences
from fnlm.data._split import IMDB_LABELS, Split, classification_splits, default_val_size, train_val_split
from fnlm.data._tokenizer import WordPieceTokenizer, build_bert_tokenizer, load_tokenizer

__all__ = [
    "length_sorted_batches",
    "predict_in_order",
    "BPETokenizer",
    "IMDB_SHA256",
    "IMDB_URL",
    "DatasetError",
    "DownloadError",
    "IMDb",
    "WordPieceTokenizer",
    "bucket_lengths",
    "build_bert_tokenizer",
    "choose_buckets",
    "IMDB_LABELS",
    "Split",
    "classification_splits",
    "default_val_size",
    "download_imdb",
    "html_clean",
    "load_imdb",
    "load_imdb_splits",
    "load_bpe_tokenizer",
    "load_labelled_files",
    "read_labelled_file",
    "load_tokenizer",
    "make_batches",
    "pack_rows",
    "pack_sequences",
    "padding_efficiency",
    "subset",
    "train_val_split",
    "MAX_TEXT_CHARS",
    "TextTooLongError",
    "align_labels",
    "encode_windows",
    "encode_words",
    "span_positions",
    "NspPairs",
    "nsp_pairs",
    "split_sentences",
]
