"""Evidence for the papers' claims, measured on real models (another helper adds its exports here too).

* :mod:`.preservation` — :func:`feature_preservation`: per-layer and output reconstruction error (relative
  L2, Neuron Merging's WARE), top-1 agreement and KL between an original and a pruned / merged model.
* :mod:`.hessian`, :mod:`.paths`, :mod:`.direction` — gRDA's directional-pruning diagnostics: Hessian-vector
  products and Lanczos top-k eigenpairs, loss along linear / Bézier paths, :func:`analyze_direction`.
"""
from .direction import DirectionOptions, analyze_direction, norm_ratio_from_log
from .hessian import HessianOperator, lanczos, projection_fraction, top_hessian_eigenpairs
from .paths import PathEvaluator, bezier_point, linear_point, train_bezier
from .preservation import feature_preservation, ware_terms

__all__ = ["feature_preservation", "ware_terms"]
__all__ += ["DirectionOptions", "HessianOperator", "PathEvaluator", "analyze_direction", "bezier_point",
            "lanczos", "linear_point", "norm_ratio_from_log", "projection_fraction", "top_hessian_eigenpairs",
            "train_bezier"]
