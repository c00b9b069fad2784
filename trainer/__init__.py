"""scalesft's trainer package. Importing it silences third-party noise that would otherwise precede scalesft's
own lines (see quiet_third_party)."""

import logging


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community" as a warning
    on import (peft and transformers import it even for runs that never quantize) and falls back to its own
    kernel: drop that line. The logger is configured before bitsandbytes creates it, so the import order does not
    matter."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward"))


quiet_third_party()
