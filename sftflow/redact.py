"""Secrets never reach MLflow (params, tags, artifacts) or logs: one place that masks them.

Two rules: a value under a secret-looking key (token, secret, password, api_key, ...) is masked whatever it is,
and the values of secret environment variables (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, anything named like
*_TOKEN, *_SECRET, *_PASSWORD, *_API_KEY) are cut out of any text, wherever they were pasted. Credentials in
URLs (`scheme://user:password@host`) are masked too.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# A config or param key: the last dotted part holds token/secret/password/api_key as a whole word part, so
# `hub_token` and `api_key` match but `max_tokens` and `tokenizer` do not.
SECRET_KEY = re.compile(r"(^|[_.-])(token|secret|passw(or)?d|api[_-]?key|access[_-]?key|credentials?)($|[_.-])",
                        re.IGNORECASE)
SECRET_ENV = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}
MIN_SECRET_CHARS = 6  # shorter env values ("1", "true") are settings, not secrets, and would mask everything
URL_CREDENTIALS = re.compile(r"(://[^/:@\s]+:)[^@/\s]+@")


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def secret_values() -> list[str]:
    """Values of secret environment variables, longest first (so a secret containing another is cut whole)."""
    found = {v for k, v in os.environ.items()
             if (k in SECRET_ENV or is_secret_key(k)) and len(v) >= MIN_SECRET_CHARS}
    return sorted(found, key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` with secret env values and URL passwords masked."""
    for value in secret_values():
        text = text.replace(value, MASK)
    return URL_CREDENTIALS.sub(rf"\g<1>{MASK}@", text)


def redact(tree: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) safe to log: secret keys masked, strings scrubbed."""
    if key and is_secret_key(key) and tree not in (None, ""):
        return MASK
    if isinstance(tree, dict):
        return {k: redact(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        return scrub(tree)
    return tree

