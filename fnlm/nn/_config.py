"""Hyper-parameters of the Transformer: a frozen (hashable) dataclass, separate from the params."""

from __future__ import annotations

from dataclasses import dataclass

from fnlm.nn._feedforward import ACTIVATIONS

POSITIONAL = ("sinusoidal", "learned", "relative")


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and switches of an encoder / decoder / encoder–decoder Transformer.

    Defaults are the paper's base model (Vaswani et al. 2017, Table 3).
    """

    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_layers: int = 6  # encoder layers
    n_decoder_layers: int | None = None  # defaults to n_layers
    dropout: float = 0.1  # on every sub-layer output and on embeddings + positions
    attention_dropout: float = 0.0  # on attention probabilities (BERT: 0.1)
    activation: str = "relu"
    norm_first: bool = False  # False: post-LN, LN(x + Sublayer(x)) as in the paper and BERT
    final_norm: bool | None = None  # a LayerNorm after each stack; default: only for pre-LN
    layer_norm_eps: float = 1e-5
    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    max_len: int = 512  # positions of a learned table (and sanity limit)
    positional: str = "sinusoidal"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_embeddings: bool = True  # E[t] * sqrt(d_model), §3.4
    tie_output: bool = False  # output projection = target embedding^T (§3.4)
    init_std: float | None = None  # None: Xavier uniform; else N(0, std^2) (BERT: 0.02)
    # attention dropout inside the fused SDPA kernel, its mask drawn from torch's global generator
    # (make_train_step(seed_global_rng=True) seeds it from the step's key), instead of explicit-key
    # masks in the written-out formula: faster where the kernel is (flash attention on GPUs)
    fused_attention_dropout: bool = False

    def __post_init__(self):
        for name in ("d_model", "n_heads", "d_ff", "n_layers", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {self.positional!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def d_k(self) -> int:
        return self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def use_final_norm(self) -> bool:
        return self.norm_first if self.final_norm is None else self.final_norm
