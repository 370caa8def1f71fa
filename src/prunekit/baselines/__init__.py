"""The structured-pruning baselines that LLM/ViT pruning papers compare against, on the engine's groups.

* ``magnitude`` — Torch-Pruning's ``GroupMagnitudeImportance``: every parameter slice a channel owns in its
  group (producer rows, consumer columns, norm scales), mean-normalised; also the engine criteria
  ``magnitude`` (p = 1) and ``magnitude-l2`` (p = 2) (:mod:`.magnitude`).
* ``wanda-sp`` — structured Wanda as defined and run by FLAP: ``Σ |W_ij| · ‖X_j‖₂`` over the columns a head /
  MLP neuron owns in its consumer (:mod:`.wanda`).
* ``flap`` — FLAP (An et al., AAAI 2024): fluctuation metric ``var_j(X) · ‖W_{:,j}‖²``, adaptive global
  structure over standardised scores, bias compensation of the removed inputs' mean (:mod:`.flap`).

All are structured (whole heads / neurons / channels through :class:`~prunekit.engine.ChannelGraph` groups),
use no labels and no fine-tuning. Consumer-input statistics come from one streamed pass
(:mod:`.activations`); :mod:`.groups` reads the groups; :mod:`.method` registers the three methods.
Formulas, shapes and deviations from the papers: ``docs/baselines.md``.
"""
from . import magnitude as _magnitude  # noqa: F401  (registers the criteria)
from .activations import InputStats, input_statistics
from .flap import adaptive_keep, column_metric, compensation_offsets, flap_scores, flap_standardized
from .groups import Columns, channel_costs, classify, consumer_columns, member_slices
from .magnitude import group_magnitude
from .method import baseline_plan, flap_method, magnitude_method, wanda_sp_method
from .wanda import wanda_sp_scores

__all__ = [
    "Columns", "InputStats", "adaptive_keep", "baseline_plan", "channel_costs", "classify", "column_metric",
    "compensation_offsets", "consumer_columns", "flap_method", "flap_scores", "flap_standardized", "group_magnitude",
    "input_statistics", "magnitude_method", "member_slices", "wanda_sp_method", "wanda_sp_scores",
]
