"""The job spec: its schema and validation (``job``), the toolkit every spec builds on (``base``), the ``tune``
section (``tune``), target-module patterns (``targets``) and where a job's files live (``storage``). Pure: no
Ray, no torch; of the rest of ``pipelines`` it imports only the names of the built-in datasets."""

from pipelines.spec.base import (  # noqa: F401
    SEED_MAX,
    Float,
    Int,
    Problem,
    Section,
    SpecError,
    UserError,
    apply_overrides,
    load_file,
    parse_override,
    quote,
    read_yaml,
    set_path,
    validate_spec,
)
from pipelines.spec.job import (  # noqa: F401
    DataSpec,
    JobSpec,
    ModelSpec,
    field_reference,
    pattern_bits,
    reference_markdown,
    register_check,
    resolve_paths,
    validate,
)
from pipelines.spec.storage import (  # noqa: F401
    ADAPTER_DIR,
    META_FILE,
    PROBE_FILE,
    adapter_meta,
    raypeft_home,
    read_meta,
    storage_dir,
)
from pipelines.spec.targets import (  # noqa: F401
    is_target,
    missing_targets_message,
    pattern_key,
    pattern_value,
    target_matches,
)
from pipelines.spec.tune import (  # noqa: F401
    TunedJobSpec,
    budget_share,
    concurrency,
    load_spec,
    trial_raw,
    validate_document,
    with_tune,
)
