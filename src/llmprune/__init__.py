"""llmprune: one-shot pruning of large language models (Wanda, SparseGPT, magnitude, RIA; OWL layer-wise sparsity)."""

__version__ = "0.1.0"

from .compressed import load  # noqa: E402
from .api import PruneResult, evaluate_perplexity, prune  # noqa: E402
from .config import Calibration, EvalSettings  # noqa: E402
from .methods import DSnoT, LeastSquares, Permute  # noqa: E402
from .errors import UsageError  # noqa: E402
from .layerwise import OWL  # noqa: E402
from .loading import load_model  # noqa: E402
from .patterns import NM, Unstructured, parse_pattern, select  # noqa: E402
from .zeroshot import ZeroShotSettings, evaluate_zero_shot  # noqa: E402  (imports lm_eval only when called)

__all__ = [
    "NM", "OWL", "Calibration", "DSnoT", "EvalSettings", "LeastSquares", "Permute", "PruneResult", "Unstructured", "UsageError", "ZeroShotSettings",
    "evaluate_perplexity", "evaluate_zero_shot", "load", "load_model", "parse_pattern", "prune", "select",
]
