"""A job's data: records read, formatted, tokenized, packed and collated (``records``), and the driver-side
preparation on Ray Data that tokenizes once into memory-mapped shards (``prepare``)."""

from pipelines.data.prepare import (  # noqa: F401
    dataset_hash,
    eval_source,
    open_layout,
    plan_chunks,
    read_chunk,
)
from pipelines.data.records import (  # noqa: F401
    IGNORE,
    DataError,
    FormatError,
    Sharder,
    check_split,
    collate,
    encode,
    encode_all,
    encode_batch,
    encode_ids,
    eval_batches,
    eval_is_train_problem,
    eval_shard,
    load_records,
    pack,
    pack_bfd,
    pick_split,
    prompt_and_completion,
    reference_of,
    resolve_source,
    shared_prefix,
    split_names,
    task_prompts,
    train_eval_records,
    url_fingerprint,
)
