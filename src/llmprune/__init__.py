"""llmprune: one-shot pruning of large language models (Wanda, SparseGPT, magnitude, RIA; OWL layer-wise sparsity)."""

from ._version import __version__  # noqa: F401  (llmprune.__version__)
from .compressed import load
from .api import PruneResult, evaluate_perplexity, prune, prune_structured
from .config import Calibration, EvalSettings
from .methods import DSnoT, LeastSquares, Permute
from .errors import UsageError
from .layerwise import OWL
from .loading import load_model
from .patterns import NM, Unstructured, parse_pattern, select
from .structured import Structured
from .zeroshot import ZeroShotSettings, evaluate_zero_shot  # imports lm_eval only when called

__all__ = [
    "NM", "OWL", "Calibration", "DSnoT", "EvalSettings", "LeastSquares", "Permute", "PruneResult", "Unstructured", "UsageError", "ZeroShotSettings",
    "Structured", "evaluate_perplexity", "evaluate_zero_shot", "load", "load_model", "parse_pattern", "prune", "prune_structured",
    "select",
]
