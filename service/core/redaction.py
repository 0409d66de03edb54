"""Secrets never reach a log line: every record of the process is redacted as it is made.

Tokens travel where log lines look: in query strings (`?access_token=` of an EventSource, `?token=`
of the dashboard), which uvicorn's access log prints, and in the URLs that httpx puts in its
exceptions (a webhook target may carry its receiver's key in its query). So a log record factory,
which sees every record of every logger before any handler formats it, rewrites the message, its
arguments, the traceback and the stack: the value of every secret-looking query parameter, bearer
and basic credentials, URL passwords (and a lone user name, often a token), the path of URLs of
services whose webhook URL is its own key (Slack, Discord, Teams, Telegram...), JWTs, webhook
secrets, and the configured secrets themselves; a format string too, between its placeholders.
Fields given with `extra=` (which a JSON formatter prints) are redacted too, and a URL object logged
as an argument (httpx's request line) is reduced to its label: a webhook target's path may be its
key, whoever receives it. Python warnings, which would go to stderr past every record, are routed
through logging.

The rest of the code does not lean on this net: it logs a target by its label (`url_label`) and a
URL with a password without it (`without_password`).
"""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from runbell.listeners.connect import without_password_options

MASK = "***"
KNOWN_MIN_LENGTH = 8

# A query parameter whose name says it holds a secret: its value is masked, the name kept.
_SECRET_NAME = r"[^=&\s#\"'<>]*(?:token|secret|passw|pwd|key|sig|auth|session|jwt|credential|code)[^=&\s#\"'<>]*"
# Services whose webhook URL carries its key in the path: everything after the host is masked.
_KEY_IN_PATH_HOST = (
    r"(?:hooks\.slack\.com|(?:[a-z0-9-]+\.)?discord(?:app)?\.com(?=/api/webhooks/)|[a-z0-9.-]*\.webhook\.office\.com"
    r"|outlook\.office(?:365)?\.com(?=/webhook)|api\.telegram\.org(?=/bot)|hooks\.zapier\.com|chat\.googleapis\.com)"
)
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"(?i)([?&;]{_SECRET_NAME}=)[^&\s#\"'<>]+"), rf"\g<1>{MASK}"),
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+"), rf"\g<1>\g<2>{MASK}"),
    # scheme://user:password@host, the password up to the "@" as drivers read it ("/" included: base64
    # ones hold them), unless it reads as a port and a path (host:8443/users/@alice has no userinfo).
    (re.compile(r"(?i)(://[^/\s:@]*:)(?!\d*/)[^\s@]+@"), rf"\g<1>{MASK}@"),
    (re.compile(r"(?i)(://)[^/\s:@]+@"), rf"\g<1>{MASK}@"),  # scheme://token@host: a lone user name is often a key
    (re.compile(rf"(?i)(://{_KEY_IN_PATH_HOST}(?::\d+)?/)[^\s\"'<>]+"), rf"\g<1>{MASK}"),  # the path is the key
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), MASK),  # a JWT, wherever it is
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), f"whsec_{MASK}"),  # a webhook signing secret
]
_KEEP = (numbers.Number, type(None))
_EXTRA_DEPTH = 8  # nesting of an extra= field redacted item by item; deeper, it is redacted as its text


class Redactor:
    """Masks secrets in text: by their shape, and the known ones (configured tokens) wherever they are."""

    def __init__(self, known: Iterable[str] = ()):
        # The longer first (one may contain another); a short one would mask every word it is part of.
        self.known = sorted({s for s in known if len(s) >= KNOWN_MIN_LENGTH}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.known:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


class _Redacted:
    """A log argument that is not a plain value: formatted (%s or %r) then redacted."""

    def __init__(self, value: Any, redact: Redactor):
        self.value, self.redact = value, redact

    def __str__(self) -> str:
        return self.redact(str(self.value))

    def __repr__(self) -> str:
        return self.redact(repr(self.value))


def url_label(url: str | httpx.URL) -> str:
    """What a log line may say of a URL that can be a secret as a whole (a webhook target): scheme,
    host and port, no user, path or query."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "(a URL)"
    if not parsed.scheme or not parsed.host:
        return "(a URL)"
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{parsed.scheme}://{host}" + (f":{parsed.port}" if parsed.port else "")


# scheme://user:password@ as SQLAlchemy reads it: the password runs to the "@", a "/" in it (base64
# passwords hold them) included, where urllib sees no password at all.
_DRIVER_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)([^@\s]+)@")


def url_password(url: str) -> str | None:
    """The password of a Redis or database URL, as urllib reads it, else as SQLAlchemy does."""
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL that can be split: the driver's reading still may find one
        password = None
    found = _DRIVER_PASSWORD.match(url)
    return password if password is not None else found.group(2) if found else None


def without_password(url: str) -> str:
    """A URL fit for a log line (a Redis or database URL): any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        url = _DRIVER_PASSWORD.sub(rf"\g<1>{MASK}@", url, count=1)
    else:
        netloc = f"{parts.username or ''}:{MASK}@{parts.netloc.rpartition('@')[2]}"
        url = urlunsplit(parts._replace(netloc=netloc))
    return without_password_options(url)  # a Sentinel's own password is an option


_redactor = Redactor()
_installed = False


def redact(text: str) -> str:
    """The text with every secret masked, as log lines are."""
    return _redactor(text)


def install_log_redaction(known: Iterable[str] = ()) -> None:
    """Redact every log record made from now on in this process (idempotent; `known` adds secrets)."""
    global _redactor, _installed
    _redactor = Redactor([*_redactor.known, *known])
    # warnings.warn writes to stderr past every log record; routed through logging ("py.warnings"),
    # its text is an argument of a record, and redacted as one.
    logging.captureWarnings(True)
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            redact_record(record, _redactor)
        except Exception:  # a record that cannot be redacted is not logged as it was
            record.msg, record.args, record.exc_info, record.exc_text = "(a log record that could not be redacted)", (), None, None
        return record

    logging.setLogRecordFactory(redacted_record)

    # extra= fields are set on the record after the factory made it (Logger.makeRecord), so they are
    # redacted there; patched on the class, it holds for the loggers that exist already (uvicorn's).
    make_logger_record = logging.Logger.makeRecord

    def redacted_logger_record(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_logger_record(self, *args, **kwargs)
        extra = kwargs.get("extra", args[8] if len(args) > 8 else None)
        if extra:
            try:
                for key in extra:
                    record.__dict__[key] = _extra(record.__dict__[key], _redactor, _EXTRA_DEPTH)
            except Exception:  # as for a record that cannot be redacted: its fields are dropped
                for key in extra:
                    record.__dict__[key] = "(a field that could not be redacted)"
        return record

    logging.Logger.makeRecord = redacted_logger_record  # type: ignore[method-assign]


# A %-placeholder of a format string (printf-style, as logging formats): never masked.
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")


def redact_record(record: logging.LogRecord, redactor: Redactor) -> None:
    """Mask secrets in the record's message, arguments (kept as arguments: uvicorn's access log
    formatter unpacks them), traceback and stack. A format string with arguments is masked between
    its placeholders, so that the formatting still finds each of them."""
    if record.args and isinstance(record.msg, str):
        record.msg = _format_string(record.msg, redactor)
    else:
        record.msg = _arg(record.msg, redactor)
    if isinstance(record.args, Mapping):
        record.args = {key: _arg(value, redactor) for key, value in record.args.items()}
    elif record.args:
        record.args = tuple(_arg(value, redactor) for value in record.args)
    if record.exc_info and not record.exc_text:
        record.exc_text = redactor(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redactor(record.stack_info)


def _format_string(msg: str, redactor: Redactor) -> str:
    """The format string with the text between its placeholders redacted, the placeholders kept."""
    parts, start = [], 0
    for placeholder in _PLACEHOLDER.finditer(msg):
        parts += [redactor(msg[start : placeholder.start()]), placeholder.group()]
        start = placeholder.end()
    return "".join([*parts, redactor(msg[start:])])


def _arg(value: Any, redactor: Redactor) -> Any:
    if isinstance(value, str):
        return redactor(value)
    if isinstance(value, httpx.URL):  # httpx's request line: the label, as every target is logged
        return url_label(value)
    if isinstance(value, _KEEP):
        return value
    return _Redacted(value, redactor)


def _extra(value: Any, redactor: Redactor, depth: int) -> Any:
    """A redacted copy of an extra= field: mappings and sequences item by item (a JSON formatter
    prints them so), other values as _arg does."""
    if depth > 0 and isinstance(value, Mapping):
        return {key: _extra(item, redactor, depth - 1) for key, item in value.items()}
    if depth > 0 and type(value) in (list, tuple):  # not a subclass (a named tuple): built otherwise
        return type(value)(_extra(item, redactor, depth - 1) for item in value)
    return _arg(value, redactor)
