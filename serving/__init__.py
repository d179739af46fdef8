"""Ray Serve: one shared base per replica, mixed-adapter batches, an OpenAI-compatible HTTP API."""

import pipelines  # noqa: F401 - first: it quiets bitsandbytes' hub-kernel notice before anything imports bitsandbytes
