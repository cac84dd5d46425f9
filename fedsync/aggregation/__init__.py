"""Server-side aggregation: staleness discounts, rules, server optimizers, strategies.

Parts are small objects that compose::

    from fedsync.aggregation import Strategy, norm_clipping, trimmed_mean, polynomial_staleness

    strategy = Strategy(
        rule=norm_clipping(max_norm=5.0) | trimmed_mean(beta=0.1),
        staleness=polynomial_staleness(a=0.5),
        max_staleness=8,
        buffer_size=10,
    )
    new_global = strategy.aggregate(global_weights, updates)
"""

from ._optimizers import ServerOptimizer, server_momentum, server_sgd
from ._robust import coordinate_median, krum, multi_krum, trimmed_mean
from ._rules import AggregationRule, Pipeline, Preprocessor, norm_clipping, weighted_mean
from ._staleness import (
    StalenessFunction,
    constant_staleness,
    hinge_staleness,
    polynomial_staleness,
)
from ._strategy import Strategy
from ._update import Update
from ._validation import DeltaRejected, validate_delta

__all__ = [
    "AggregationRule",
    "DeltaRejected",
    "Pipeline",
    "Preprocessor",
    "ServerOptimizer",
    "StalenessFunction",
    "Strategy",
    "Update",
    "constant_staleness",
    "coordinate_median",
    "hinge_staleness",
    "krum",
    "multi_krum",
    "norm_clipping",
    "polynomial_staleness",
    "server_momentum",
    "server_sgd",
    "trimmed_mean",
    "validate_delta",
    "weighted_mean",
]
