"""The training job: the driver that validates, prepares and launches it on Ray Train (``driver``), the worker
(``worker``) and its phases (``setup``, ``inputs``, ``checkpoint``, ``loop``; what passes between them is
``state``'s), the engines that step it under DDP or DeepSpeed ZeRO (``engines``), the loss (``loss``),
attention per example and the micro-batch layout (``attention``), evaluation (``evaluate``) and the
pre-flight checks (``preflight``).
The only part of ``pipelines`` that imports ``data`` and ``model`` together."""

from pipelines.train.attention import batch_layout  # noqa: F401
from pipelines.train.checkpoint import probe_logits  # noqa: F401
from pipelines.train.driver import (  # noqa: F401
    job_lineage,
    main,
    make_trainer,
    run,
)
from pipelines.train.engines import (  # noqa: F401
    STALE_BUILD_S,
    build_engine,
    deepspeed_setup,
    prebuild_ops,
    save_adapter,
    stale_build_lock,
)
from pipelines.train.evaluate import (  # noqa: F401
    eval_loss,
    task_metric,
    task_score,
)
from pipelines.train.loop import accumulate, lr_factor  # noqa: F401
from pipelines.train.loss import (  # noqa: F401
    label_tokens,
    token_loss_sum,
)
from pipelines.train.preflight import (  # noqa: F401
    PreflightError,
    load_checked_spec,
    load_tuned,
    module_names,
    split_problems,
)
from pipelines.train.worker import train_worker  # noqa: F401
