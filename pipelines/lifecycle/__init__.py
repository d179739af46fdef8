"""What happens to an adapter after training: the registry and its gated promotions (``registry``), the adapter
toolbox (``adapters``: local_adapter, export, merge, combine), memory planning (``plan``) and the CLI's commands
(``commands``)."""

from pipelines.lifecycle.adapters import (  # noqa: F401
    AdapterError,
    combine,
    compatibility_problems,
    export,
    load_base_as_trained,
    local_adapter,
    resolve,
)
from pipelines.lifecycle.plan import (  # noqa: F401
    DTYPE_BYTES,
    breakdown_of,
    layers_of,
    plan_of,
    shape_of,
)
from pipelines.lifecycle.registry import (  # noqa: F401
    show,
)
