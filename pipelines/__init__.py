"""raypeft's training pipeline. Importing it (``serving`` and ``tuning`` do, first thing) quiets one notice
of bitsandbytes: on a CPU with AVX512-BF16, importing bitsandbytes (which PEFT and transformers do) logs
"Failed to load CPU gemm_4bit_forward from kernels-community" when the optional ``kernels`` package is
absent, in every command, whether or not anything is quantized. Training never uses that kernel
(``pipelines.model.loading.one_4bit_layout``); a quantized job on CPU says in its own log which kernels it uses.

It also quiets transformers' FutureWarning that ``is_gradient_checkpointing`` is deprecated, which PEFT's
``get_peft_model`` triggers by reading that attribute, in every command that checks a spec: a notice about
two libraries' versions, nothing a user can act on.

And it loads the method registry, whose check of the method section every ``pipelines.spec.job.validate`` runs
(``register_check``): the spec imports none of its consumers."""

import logging
import warnings


def _not_the_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return "kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_hub_kernel_notice)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from pipelines.model import methods as _methods  # noqa: E402,F401 - registers the methods' spec checks
