"""Hide credentials before text leaves the process: console, Prefect, MLflow, error messages.

Dependency-free on purpose, so the CLI, the flows and error messages can use it without
importing MLflow or Prefect.

    redact_value("postgresql://u:pw@db/x")        -> "postgresql://u:<redacted>@db/x"
    redact({"aws_secret_access_key": "abc"})       -> {"aws_secret_access_key": "<redacted>"}
    redact_override("data.source=s3://k:s@h/x")    -> "data.source=s3://k:<redacted>@h/x"
"""

from __future__ import annotations

import re
from typing import Any, Mapping

REDACTED = "<redacted>"

# Words of a key (split on `_ . - /`, spaces and camelCase) that mark its value as a secret.
_SECRET_WORDS = {
    "password", "passwd", "pwd", "secret", "token", "key", "apikey", "accesskey",
    "secretkey", "credential", "credentials", "auth", "authorization", "private",
    "privatekey", "cookie",
}  # fmt: skip
# Values that are secrets whatever their key is called.
_SECRET_VALUES = [
    re.compile(r"^\s*(bearer|basic|token)\s+\S+", re.IGNORECASE),  # HTTP auth headers
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),  # GitHub tokens
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),  # Hugging Face tokens
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
# scheme://user:password@host -> scheme://user:<redacted>@host
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<pw>[^@/\s]*)@")
# Token formats that may sit mid-line in a longer text (an error message); an auth header
# (`Bearer ...`) is only recognised as a whole value.
_TOKENS_IN_TEXT = _SECRET_VALUES[1:]


def _key_words(key: str) -> set[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return {word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word}


def is_secret_key(key: str) -> bool:
    """True for keys like `aws_secret_access_key`, `db.password`, `apiKey`, `MLFLOW_TRACKING_TOKEN`.

    Matches whole words, so `eval.max_new_tokens` or `ppo.kl_coef` are not secrets.
    """
    return bool(_key_words(key) & _SECRET_WORDS)


def redact_value(value: str) -> str:
    """Hide the password of `scheme://user:pw@host` URIs; hide known token formats entirely."""
    if any(pattern.search(value) for pattern in _SECRET_VALUES):
        return REDACTED
    return _URI_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", value)


def redact_text(text: str) -> str:
    """A message or log line with URI passwords and known tokens hidden, the rest kept."""
    text = _URI_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)
    for pattern in _TOKENS_IN_TEXT:
        text = pattern.sub(REDACTED, text)
    return text


def redact(items: Mapping[str, Any]) -> dict[str, str]:
    """Params or tags as strings, with anything that looks like a credential replaced."""
    clean: dict[str, str] = {}
    for key, value in items.items():
        text = "" if value is None else str(value)
        clean[str(key)] = REDACTED if is_secret_key(str(key)) and text else redact_value(text)
    return clean


def redact_override(text: str) -> str:
    """`section.key=value` with the value redacted as `redact` would (by key, then by value)."""
    key, sep, value = text.partition("=")
    if not sep:
        return redact_text(text)
    if is_secret_key(key) and value.strip():
        return f"{key}={REDACTED}"
    return f"{key}={redact_value(value)}"
