"""Merge strategies: one module per method family, one registry (see ``base``).

Importing this package registers every built-in strategy.
"""

from fedmerge.merging.strategies.base import (  # noqa: F401
    ModelParams,
    Strategy,
    StrategyError,
    StrategyParams,
    TensorContext,
    available,
    build_strategy,
    get_strategy_class,
    register,
)

# Built-in method families; each module registers its strategies on import.
from fedmerge.merging.strategies import linear  # noqa: F401,E402
from fedmerge.merging.strategies import sparsify  # noqa: F401,E402
from fedmerge.merging.strategies import slerp  # noqa: F401,E402
from fedmerge.merging.strategies import hierarchical  # noqa: F401,E402
