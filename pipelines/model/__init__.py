"""The model a job trains: the base, loaded and quantized as the spec says (``loading``), and the method registry
that wraps it in an adapter (``methods``)."""

from pipelines.model.loading import (  # noqa: F401
    LOADS,
    base_lineage,
    cached_model_dir,
    load_base,
    load_tokenizer,
    meta_model,
    model_bytes,
    module_names,
    one_4bit_layout,
    quantization_config,
    resolve_base,
    tiny_llama,
    torch_dtype,
    trained_base_spec,
)
from pipelines.model.methods import (  # noqa: F401
    REGISTRY,
    Prepared,
    config_problem,
    get_method,
    method_names,
)
