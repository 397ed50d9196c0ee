"""Secret masking: what a run logs, prints or stores never shows a password, token or key.

`mask_secrets` rewrites `scheme://user:pass@host` to `scheme://user:***@host`, secret query
values (`?token=...`) and bearer tokens; `redact` also masks every value under a key that names
a secret (password, token, secret, api_key, ...), whatever the nesting.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

_SECRET_KEY_RE = re.compile(
    r"(^|_)(password|passwd|pwd|passphrase|token|secret|api_?key|access_?key|private_?key|"
    r"credentials?|authorization|auth_token|session_key|signature)(_|$)"
)
# The password runs to the LAST "@" of the authority (it ends at the first / ? #), as urlsplit
# reads it: `http://u:p@ss@host` connects with password "p@ss", so all of it is masked.
_URI_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^/?#\s]*)@")
_SECRET_QUERY_RE = re.compile(
    r"(?P<key>[?&;][^=&#\s]*(?:password|passwd|token|secret|key|signature|sig|credential)[^=&#\s]*=)[^&#\s]*",
    re.IGNORECASE,
)
_BEARER_RE = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """True when a (possibly dotted, camelCase or snake_case) key names a secret.

    Matches whole words only, so `hf_token`, `db.password`, `apiKey` are secret while
    `tokenizer` and `max_new_tokens` are not.
    """
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key))
    words = re.sub(r"[^A-Za-z0-9]+", "_", words).lower()
    return bool(_SECRET_KEY_RE.search(words))


def mask_secrets(value: Any) -> str:
    """The string form of `value` with URI passwords, secret query values and bearer tokens masked.

    `http://user:pass@host` -> `http://user:***@host`; `...?token=abc&x=1` -> `...?token=***&x=1`.
    """
    text = str(value)
    text = _URI_USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _SECRET_QUERY_RE.sub(lambda m: f"{m['key']}{MASK}", text)
    return _BEARER_RE.sub(lambda m: f"{m.group(1)} {MASK}", text)


def redact(obj: Any, key: str = "") -> Any:
    """A copy of a nested structure with secret-named keys masked and secrets in strings masked."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if key and is_secret_key(key) and obj not in (None, ""):
        return MASK
    if isinstance(obj, Mapping):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask_secrets(obj)
    return obj
