"""fnlm: a pure-functional, JAX-style Transformer framework on torch.func."""
from fnlm import random, tree

__version__ = "0.1.0"
