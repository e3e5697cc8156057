"""Credentials never leave the process: URIs are redacted before they reach params, tags, logs, messages or files.

A URI may carry credentials in its user info (`https://user:secret@host`, `s3://KEY_ID:SECRET@bucket`) or in its
query (`...?access_key=...&secret_key=...`, a signed URL's `X-Amz-Signature`). `redact_uri` replaces them with
`***`; `scrub` does the same to every URI inside a text (an error message of a library that echoes the URI) and
removes every secret value `remember_secrets` saw, wherever it appears. `RedactingFilter` applies `scrub` to
every log record of the handlers it is installed on (`install_log_filter`); `scrub_stdio` to everything this
process prints. `hide_secret_overrides` takes a Hydra override's secret value out of the command line, into an
environment variable that the override then names (`${oc.env:PIPELINE_SECRET_0}`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

MASK = "***"
# Query keys whose values are credentials (matched case-insensitively, as substrings: secret_key, access_key,
# session_token, X-Amz-Signature, X-Amz-Credential, sig, password, client_secret, api_key, sas tokens ...).
_SECRET_KEY_PARTS = ("secret", "token", "password", "passwd", "pwd", "key", "sig", "credential", "auth")
# Keys that contain one of those parts but carry no secret.
_NOT_SECRET_KEYS = {"key_prefix"}
# A URI in running text: the user info may hold characters that end the rest of a URI in prose (a password with a
# comma or a bracket), so it runs to its `@`.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?:[^\s'\"<>@]*@)?[^\s'\"<>()\[\]{},]*")
# User info as written, up to the URI's last `@`: a password may hold `/`, `?` or `#` unencoded (AWS secret keys
# often hold `/`), which ends the authority for urlsplit and would leave the secret in the "path".
_RAW_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^\s]*?:[^\s]*)@([^\s@]*)")
SECRET_ENV_PREFIX = "PIPELINE_SECRET_"
_known: set[str] = set()


def _is_secret_key(key: str) -> bool:
    key = unquote_plus(key).lower()
    return key not in _NOT_SECRET_KEYS and any(part in key for part in _SECRET_KEY_PARTS)


def _query_pairs(query: str) -> list[tuple[str, str, str]]:
    """(raw key, "=" or "", raw value) of each &-separated part, as written (not decoded)."""
    return [pair.partition("=") for pair in query.split("&")] if query else []


def _split(uri: str):
    try:
        return urlsplit(uri)
    except ValueError:
        return None


def secrets_of(uri: str) -> list[str]:
    """The credential values a URI carries (its whole user info and its password, its secret query values), as
    written and decoded."""
    parts = _split(uri)
    if parts is None:
        return []
    found = []
    raw = _RAW_USERINFO.fullmatch(uri)
    if raw and "@" not in parts.netloc:  # a password with / ? or #: urlsplit cut the authority short
        userinfo = raw.group(2)
        found += [userinfo, unquote(userinfo), userinfo.split(":", 1)[1], unquote(userinfo.split(":", 1)[1])]
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found += [userinfo, unquote(userinfo)]
        if ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            found += [password, unquote(password)]
    for key, _, value in _query_pairs(parts.query):
        if value and _is_secret_key(key):
            decoded = unquote_plus(value)
            found += [value, decoded, quote(decoded, safe="")]
    return [s for s in dict.fromkeys(found) if len(s) >= 3]


def redact_uri(uri: str | None) -> str | None:
    """The URI with its user info and its credential query values replaced by ***; a URI without credentials
    comes back unchanged, character for character."""
    if not uri or "://" not in uri:
        return uri
    parts = _split(uri)
    if parts is None:
        return MASK
    raw = _RAW_USERINFO.fullmatch(uri)
    if raw and "@" not in parts.netloc:  # a password with / ? or #: see _RAW_USERINFO
        return redact_uri(f"{raw.group(1)}{MASK}@{raw.group(3)}")
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    pairs = _query_pairs(parts.query)
    hidden = [(k, eq, MASK if v and _is_secret_key(k) else v) for k, eq, v in pairs]
    if netloc == parts.netloc and hidden == pairs:
        return uri
    query = "&".join(f"{k}{eq}{v}" for k, eq, v in hidden)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def find_uris(text: str) -> list[str]:
    """Every URI in a text (a command line, an error message)."""
    return _URI.findall(text or "")


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


def redact_values(value: Any) -> Any:
    """value with every string in it scrubbed (through dicts, lists and tuples): for params and config files."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value


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


class ScrubbedStream:
    """A text stream that scrubs what is written through it; everything else is the wrapped stream's."""

    def __init__(self, stream):
        self.wrapped = stream

    def write(self, text: str) -> int:
        self.wrapped.write(scrub(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)


def scrub_stdio() -> None:
    """Scrub everything this process prints: what libraries print themselves (Hydra's report of an uncaught error,
    the lines Ray forwards from its workers) passes no log filter."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ScrubbedStream):
            setattr(sys, name, ScrubbedStream(stream))


def _secret_value(override: str) -> str | None:
    """The value of a `key=value` Hydra override when it is one string that carries credentials."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "=" not in override or not any(secrets_of(uri) for uri in find_uris(override)):
        return None
    try:
        value = OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001 - not an override Hydra reads: composing names the problem, scrubbed
        return None
    return value if isinstance(value, str) and any(secrets_of(uri) for uri in find_uris(value)) else None


def hide_secret_overrides(overrides: list[str], taken: Mapping[str, str] | None = None
                          ) -> tuple[list[str], dict[str, str]]:
    """(overrides, env): each override whose value carries credentials becomes `key=${oc.env:PIPELINE_SECRET_<i>}`
    and its value goes to env under that name, so that command lines, Hydra's saved overrides and a job's entrypoint
    hold no secret, and the config still composes (with env in the environment). `taken`: names in use already
    (default: this process's environment), never reused for another value."""
    taken = os.environ if taken is None else taken
    out, env = [], {}
    for override in overrides:
        value = _secret_value(override)
        if value is None:
            out.append(override)
            continue
        index = 0
        while (name := f"{SECRET_ENV_PREFIX}{index}") in env or taken.get(name, value) != value:
            index += 1
        env[name] = value
        out.append(f"{override.split('=', 1)[0]}=${{oc.env:{name}}}")
    return out, env
