"""Secrets in settings: index URLs may carry credentials, best as `${VAR}` read from the control
node's environment. Only `expand` sees the real value, and only where it is written for the tool
that needs it (pip's config inside the build container); everything shown uses `masked`.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

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
