"""Secrets never land in logs, rendered commands or saved files. Pure: the environment is a parameter (pass
os.environ), never read here."""

from __future__ import annotations

import re
from typing import Any, Mapping

SECRET_MARKERS = ("token", "api_key", "secret", "password", "passwd", "credential")
"""A recipe key containing one of these holds a secret: its value is never written or printed."""
SECRET_ENV_SUFFIXES = ("TOKEN", "_KEY", "SECRET", "PASSWORD")
"""Environment variables whose name ends so (HF_TOKEN, WANDB_API_KEY, HUGGING_FACE_HUB_TOKEN, AWS_SECRET_ACCESS_KEY,
...) hold secrets: their values are redacted wherever they appear in a recipe, a log line or a printed command."""
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{16,}")
"""A Hugging Face access token, wherever it comes from."""
REDACTED = "***"


def _secret_key(key: Any, value: Any) -> bool:
    """A key naming a secret. A count of tokens (training.micro_batch_tokens: 4096 or auto) is not one: it must
    survive into the saved recipe.yaml, which a resumed or reloaded run reads back."""
    k = str(key).lower()
    if not any(m in k for m in SECRET_MARKERS):
        return False
    count = isinstance(value, int) or value == "auto"
    return not (k.endswith("tokens") and count and not any(m in k for m in SECRET_MARKERS if m != "token"))


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values (8 characters or more) of the secret variables in `environ` (os.environ), longest first."""
    found = {v for k, v in environ.items() if k.upper().endswith(SECRET_ENV_SUFFIXES) and len(v) >= 8}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, environ: Mapping[str, str]) -> str:
    """text with every secret environment value and every Hugging Face token replaced by ***."""
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return HF_TOKEN_PATTERN.sub(REDACTED, text)


def redacted(obj: Any, environ: Mapping[str, str]) -> Any:
    """A copy of a plain dict/list tree safe to write or print: values of secret-looking keys (token, api_key,
    password, ...) replaced by ***, and secret environment values or Hugging Face tokens inside any string."""
    if isinstance(obj, dict):
        return {k: REDACTED if _secret_key(k, v) and v else redacted(v, environ)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redacted(v, environ) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, environ)
    return obj
