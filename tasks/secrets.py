"""Secrets in settings: index URLs may carry credentials, best as `${VAR}` read from the control
node's environment (for `hf_endpoint`, only so). Only `expand` sees the real value, and only where
the tool that needs it runs: pip's config inside the build container, the control node's own
requests to the HF endpoint. Everything shown uses `masked` (or `scrubbed`, for an error text that
may quote the expanded URL). What is kept to see later that a value changed is its `fingerprint`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from urllib.parse import quote, urlsplit, urlunsplit

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def references(text: str) -> list[str]:
    """The environment variables TEXT names as `${VAR}`."""
    return REFERENCE.findall(text)


def expand(text: str) -> str:
    """TEXT with each `${VAR}` replaced from the control node's environment (KeyError if unset)."""
    return REFERENCE.sub(lambda match: os.environ[match.group(1)], text)


def public_url(url: str) -> str:
    """URL without user:password — what may reach ids, logs and labels."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def masked(url: str) -> str:
    """URL with its credentials shown as `***` (it still says that some are set)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _userinfo(url: str) -> tuple[str | None, str | None]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None, None
    return parts.username, parts.password


def has_credentials(url: str) -> bool:
    """URL carries a user:password (literal or `${VAR}`) or names any `${VAR}`."""
    return _userinfo(url) != (None, None) or bool(references(url))


def literal_credentials(url: str) -> bool:
    """URL's secret (its password, or a user name given alone) is written out rather than a `${VAR}` reference."""
    username, password = _userinfo(url)
    secret = password if password is not None else username
    return bool(secret and REFERENCE.sub("", secret))


def scrubbed(text: str, template: str) -> str:
    """TEXT with the control node's value of each `${VAR}` in TEMPLATE (as is or percent-encoded) shown as `***`."""
    for name in references(template):
        value = os.environ.get(name, "")
        for form in {value, quote(value, safe="")}:
            if form:
                text = text.replace(form, "***")
    return text


SALT = re.compile(r"[0-9a-f]{32}")  # 16 random bytes, hex


@functools.cache
def fingerprint(value: str, salt: str) -> str:
    """What may be kept of VALUE to tell later whether it changed: scrypt with SALT (16 MiB and ~30 ms a
    guess), so neither a copy of it nor a label that hashes it lets anyone test guesses of a secret cheaply."""
    return hashlib.scrypt(value.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1, dklen=16).hex()
