"""Ray Tune sweeps over a job spec and the layerwise bit-width + rank search."""

import pipelines  # noqa: F401 - first: it quiets bitsandbytes' hub-kernel notice before anything imports bitsandbytes
