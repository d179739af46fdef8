"""raypeft: parameter-efficient fine-tuning on Ray. The CLI face lives in ``raypeft.cli``."""

__version__ = "0.1.0"
