"""Credentials never leave the process: URIs are redacted before they reach params, tags, logs, messages or files.

A URI may carry credentials in its user info (`https://user:secret@host`) or in its query
(`s3://bucket?access_key=...&secret_key=...`, a signed URL's `X-Amz-Signature`). `redact_uri` replaces them with
`***`; `scrub` does the same to every URI inside a text (an error message of a library that echoes the URI) and
removes every secret value `remember_secrets` saw, wherever it appears. `RedactingFilter` applies `scrub` to
every log record of the handlers it is installed on (`install_log_filter`).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query keys whose values are credentials (matched case-insensitively, as substrings: secret_key, access_key,
# session_token, X-Amz-Signature, X-Amz-Credential, sig, password, client_secret, api_key, sas tokens ...).
_SECRET_KEY_PARTS = ("secret", "token", "password", "passwd", "pwd", "key", "sig", "credential", "auth")
# Keys that contain one of those parts but carry no secret.
_NOT_SECRET_KEYS = {"key_prefix"}
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{},]+")
_known: set[str] = set()


def _is_secret_key(key: str) -> bool:
    key = key.lower()
    return key not in _NOT_SECRET_KEYS and any(part in key for part in _SECRET_KEY_PARTS)


def secrets_of(uri: str) -> list[str]:
    """The credential values a URI carries (its password or whole user info, its secret query values)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return []
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found += [userinfo, unquote(userinfo)]
        if ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            found += [password, unquote(password)]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if _is_secret_key(key) and value:
            found += [value, quote(value, safe=""), quote(value)]
    return [s for s in dict.fromkeys(found) if len(s) >= 3]


def redact_uri(uri: str | None) -> str | None:
    """The URI with its user info and its credential query values replaced by ***."""
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _is_secret_key(k) and v else v) for k, v in pairs], safe="*:/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def remember_secrets(*uris: str | None) -> None:
    """Note the credentials of these URIs, so that scrub removes them from any text, not only from URIs."""
    for uri in uris:
        if uri:
            _known.update(secrets_of(uri))


def _redact_match(match: re.Match) -> str:
    uri = match.group(0)
    tail = len(uri) - len(uri.rstrip(".:;"))  # sentence punctuation after a URI is not part of it
    return (redact_uri(uri[: len(uri) - tail]) or "") + uri[len(uri) - tail:]


def scrub(text: str) -> str:
    """text with every URI in it redacted and every remembered secret replaced by ***."""
    if not text:
        return text
    text = _URI.sub(_redact_match, text)
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Scrubs every record's message (and its exception text) before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if scrub(text) != text:
                record.exc_text = scrub(text)
                record.exc_info = None
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Put a RedactingFilter on every handler of the logger (the root logger by default) that lacks one."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
