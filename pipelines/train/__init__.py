"""The training job: the driver that validates, prepares and launches it on Ray Train (``driver``), the worker's
phases (``worker``), the engines that step it under DDP or DeepSpeed ZeRO (``engines``), the loss (``loss``),
attention per example (``attention``), evaluation (``evaluate``) and the pre-flight checks (``preflight``).
The only part of ``pipelines`` that imports ``data`` and ``model`` together."""

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
    probe_logits,
    save_adapter,
    stale_build_lock,
)
from pipelines.train.evaluate import (  # noqa: F401
    eval_loss,
    task_metric,
    task_score,
)
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
from pipelines.train.worker import (  # noqa: F401
    accumulate,
    batch_layout,
    lr_factor,
    train_worker,
)
