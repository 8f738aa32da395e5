"""Data: the IMDb sentiment dataset and length-bucketed batching."""
from fnlm.data.batching import bucket_lengths, choose_buckets, make_batches, padding_efficiency
from fnlm.data.imdb import (
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

__all__ = [
    "IMDB_SHA256", "IMDB_URL", "DatasetError", "DownloadError", "IMDb", "bucket_lengths", "choose_buckets",
    "download_imdb", "html_clean", "load_imdb", "load_imdb_splits", "make_batches",
    "padding_efficiency", "subset",
]
