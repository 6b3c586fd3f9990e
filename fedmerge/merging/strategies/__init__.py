"""Merge strategies: one module per method family, one registry (see ``registry``).

Importing this package registers every built-in strategy; other packages add theirs through the
``fedmerge.strategies`` entry-point group.
"""

from fedmerge.merging.strategies.base import (  # noqa: F401
    ModelParams,
    Strategy,
    StrategyError,
    StrategyParams,
    TensorContext,
)
from fedmerge.merging.strategies.registry import (  # noqa: F401
    ENTRY_POINT_GROUP,
    ParameterInfo,
    RegisteredStrategy,
    StrategyInfo,
    available,
    build_strategy,
    describe,
    get_strategy_class,
    plugin_errors,
    register,
)
from fedmerge.merging.strategies.elementwise import elementwise_method  # noqa: F401

# Built-in method families; each module registers its strategies on import.
from fedmerge.merging.strategies import linear  # noqa: F401,E402
from fedmerge.merging.strategies import sparsify  # noqa: F401,E402
from fedmerge.merging.strategies import slerp  # noqa: F401,E402
from fedmerge.merging.strategies import hierarchical  # noqa: F401,E402
from fedmerge.merging.strategies import spectral  # noqa: F401,E402
from fedmerge.merging.strategies import model_stock  # noqa: F401,E402
