"""Bounds on what a gallery item carries: label size, metadata size and JSON nesting depth.

They are checked where items are written (:meth:`index.gallery.Gallery.add`, so the command line
and the service both get them) and again where stored items are read: a gallery written before
the limits, or edited by hand, may hold metadata that would break serialising a response (one
nested 500 deep made every search that returned it fail), so stored data is never trusted. What
fails on read is replaced by an explicit marker, ``{UNREADABLE_METADATA: reason}``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from index.errors import InvalidItemError

__all__ = [
    "MAX_LABEL_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_DEPTH",
    "UNREADABLE_METADATA",
    "check_label",
    "check_metadata",
    "nests_deeper",
    "stored_label",
    "stored_metadata",
]

MAX_LABEL_BYTES = 1024
# Of the metadata's JSON text, which is stored ASCII-escaped (so characters are bytes).
MAX_METADATA_BYTES = 64 * 1024
# Objects and arrays nested in one another, the metadata object itself being level 1.
MAX_METADATA_DEPTH = 32
UNREADABLE_METADATA = "unreadable_metadata"
_TRUNCATED = "…"
# JSON string literals (escapes included), removed before brackets are counted; then anything
# but brackets; then innermost empty pairs, one nesting level per pass.
_STRING_LITERAL = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^][{}]+")
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")


def check_label(position: int, label: str | None) -> None:
    """Raise :class:`InvalidItemError` unless ``label`` is None or text of at most
    ``MAX_LABEL_BYTES`` UTF-8 bytes."""
    if label is None:
        return
    if not isinstance(label, str):
        raise InvalidItemError(position, "label", f"must be text, got {type(label).__name__}")
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidItemError(position, "label", "is not valid Unicode text") from None
    if size > MAX_LABEL_BYTES:
        raise InvalidItemError(
            position, "label", f"is {size} bytes; the limit is {MAX_LABEL_BYTES} bytes"
        )


def check_metadata(position: int, metadata: Any) -> None:
    """Raise :class:`InvalidItemError` unless ``metadata`` is None or a JSON object of at most
    ``MAX_METADATA_DEPTH`` levels and ``MAX_METADATA_BYTES`` bytes, without NaN or infinity.

    An object nested past the interpreter's recursion limit (100,000 deep, say) is refused as
    too deep, not allowed to exhaust the stack.
    """
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidItemError(
            position, "metadata", f"must be a JSON object, got {type(metadata).__name__}"
        )
    too_deep = f"is nested deeper than {MAX_METADATA_DEPTH} levels"
    try:
        text = json.dumps(metadata, allow_nan=False)
    except RecursionError:
        raise InvalidItemError(position, "metadata", too_deep) from None
    except (TypeError, ValueError) as error:
        raise InvalidItemError(position, "metadata", f"is not plain JSON: {error}") from None
    if len(text) > MAX_METADATA_BYTES:
        raise InvalidItemError(
            position,
            "metadata",
            f"is {len(text)} bytes as JSON; the limit is {MAX_METADATA_BYTES} bytes",
        )
    if nests_deeper(text):
        raise InvalidItemError(position, "metadata", too_deep)


def stored_metadata(text: str) -> dict[str, Any]:
    """Stored metadata JSON as a dict, or the marker saying why it cannot be returned."""
    if len(text) > MAX_METADATA_BYTES:
        return _unreadable(f"is {len(text)} bytes, over the {MAX_METADATA_BYTES}-byte limit")
    if nests_deeper(text):
        return _unreadable(f"is nested deeper than {MAX_METADATA_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        return _unreadable(f"is not valid JSON ({error})")
    if not isinstance(value, dict):
        return _unreadable(f"is a JSON {type(value).__name__}, not an object")
    return value


def stored_label(label: str | None) -> str | None:
    """A stored label, cut to ``MAX_LABEL_BYTES`` (and marked with an ellipsis) when longer."""
    if label is None or len(label) <= MAX_LABEL_BYTES // 4:
        return label
    encoded = label.encode("utf-8", errors="replace")
    if len(encoded) <= MAX_LABEL_BYTES:
        return label
    room = MAX_LABEL_BYTES - len(_TRUNCATED.encode("utf-8"))
    return encoded[:room].decode("utf-8", errors="ignore") + _TRUNCATED


def _unreadable(reason: str) -> dict[str, Any]:
    return {UNREADABLE_METADATA: f"the stored metadata {reason}; it is not returned"}


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def nests_deeper(text: str, depth: int = MAX_METADATA_DEPTH) -> bool:
    """Whether JSON text nests objects and arrays deeper than ``depth``, found without parsing
    it (a parse of hostile text could exhaust the stack); any JSON input can be checked so."""
    if text.count("{") + text.count("[") <= depth:  # the common case, cheaply
        return False
    brackets = _NOT_BRACKET.sub("", _STRING_LITERAL.sub("", text))
    for _ in range(depth):
        if not brackets:
            return False
        brackets = _EMPTY_PAIR.sub("", brackets)  # one level: the pairs that hold nothing
    return bool(brackets)
