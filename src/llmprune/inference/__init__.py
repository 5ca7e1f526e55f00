"""2:4 inference on CUDA through cuSPARSELt.

``kernel``: the cuSPARSELt binding, the dense/sparse ``Plan`` and the ``SparseCore`` module that follows it;
``planning``: timing dense vs sparse per weight shape and token bucket; ``swap``: fused swaps of a model's
2:4 Linears (``sparsify`` / ``restore``); ``graphs``: greedy decoding with one CUDA graph per step.
"""

from .graphs import StaticDecoder
from .kernel import Plan, SparseCore
from .swap import restore, sparsify

__all__ = ["Plan", "SparseCore", "StaticDecoder", "restore", "sparsify"]
