"""Decode a JSON body the way the engine's Go ``encoding/json`` does, or refuse.

The engine (moby v20.10, built with Go 1.19) decodes request bodies into Go
structs.  Go matches an object key to a struct field *without regard to case*
(``hostconfig`` fills ``HostConfig``), using Unicode simple case folding, under
which the KELVIN SIGN (U+212A) is a ``k`` and the LATIN SMALL LETTER LONG S
(U+017F) an ``s``; when a key occurs twice the last one wins.  A policy check
that reads the body with Python's ``dict`` and exact keys would therefore read
a different request from the one the engine executes.

:func:`decode` parses the body strictly and maps every key onto the shape the
engine decodes into (``shapes.py``), returning plain Python data keyed by the
*canonical* Go field names.  It refuses, with :class:`BadRequest` naming the
place:

* bodies that are not UTF-8 JSON, or hold more than one value, ``NaN`` or
  ``Infinity`` (Go rejects them);
* two keys of one object that map to the same field, exact or folded, and a
  key repeated in a map (``Labels``: Go keeps the last one);
* keys that map to no field (Go would ignore them; we cannot be sure what a
  newer engine would do with them, so they are refused);
* values of the wrong JSON type (Go fails the request part-way; we never
  guess which part ran).

``null`` decodes to ``None``: for Go it leaves a value or a pointer at its
zero value, which the rules treat as "not set" -- except where the engine
distinguishes nil from empty (``MaskedPaths``), which the rules check.  A
``null`` string, number or bool *inside* a list or map decodes to Go's zero
value (``""``, ``0``, ``false``), as the engine stores it.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from .errors import BadRequest

# Unicode code points whose simple case folding reaches an ASCII letter.
_FOLD_SPECIAL = str.maketrans({"\u212a": "k", "\u017f": "s"})


def gofold(key: str) -> str | None:
    """The folded form Go compares struct field names with, or None when the
    key can match no ASCII field name at all."""
    if not key.isascii():
        key = key.translate(_FOLD_SPECIAL)
        if not key.isascii():
            return None
    return key.lower()


class _Pairs(list):
    """A JSON object as the ordered list of its (key, value) pairs."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DEPTH_LIMIT = 64


def parse(body: bytes | str, what: str = "body") -> Any:
    """Parse strictly; objects become :class:`_Pairs` so nothing is lost."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{what} is not valid UTF-8") from None
    try:
        value = json.loads(body, object_pairs_hook=_Pairs, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"{what} is not valid JSON ({str(e).split(':')[0]})") from None
    return value


# -- shapes ---------------------------------------------------------------------


class Shape:
    """A Go type: turns a parsed JSON value into checked Python data."""

    def decode(self, value: Any, where: str, depth: int = 0) -> Any:  # pragma: no cover
        raise NotImplementedError


def _type_error(where: str, expected: str) -> BadRequest:
    return BadRequest(f"{where}: expected {expected}")


class Scalar(Shape):
    def __init__(self, name: str, check: Callable[[Any], bool], zero: Any = None):
        self.name = name
        self.check = check
        #: Go's zero value: what a ``null`` element of a list or map becomes
        self.zero = zero

    def decode(self, value, where, depth=0):
        if value is None:
            return None
        if not self.check(value):
            raise _type_error(where, self.name)
        return value


def _int_range(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and lo <= v <= hi


STR = Scalar("a string", lambda v: isinstance(v, str), "")
BOOL = Scalar("true or false", lambda v: isinstance(v, bool), False)
INT64 = Scalar("an integer", _int_range(-(2**63), 2**63 - 1), 0)
INT = INT64  # Go int on amd64
UINT16 = Scalar("an integer 0-65535", _int_range(0, 2**16 - 1), 0)
UINT32 = Scalar("a non-negative integer", _int_range(0, 2**32 - 1), 0)
UINT64 = Scalar("a non-negative integer", _int_range(0, 2**64 - 1), 0)
UINT = UINT64


class Empty(Shape):
    """Go ``struct{}`` (the values of ``ExposedPorts`` and ``Volumes``)."""

    def decode(self, value, where, depth=0):
        if value is None:
            return None
        if not isinstance(value, _Pairs):
            raise _type_error(where, "an object")
        # Go ignores every key of an empty struct; nothing in it is read.
        return {}


class StrSlice(Shape):
    """``strslice.StrSlice``: a string or a list of strings (custom UnmarshalJSON)."""

    def decode(self, value, where, depth=0):
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and not isinstance(value, _Pairs) and all(isinstance(v, str) for v in value):
            return list(value)
        raise _type_error(where, "a string or a list of strings")


def _element(shape: Shape, value: Any, where: str, depth: int) -> Any:
    """One element of a list or map.  Go leaves a ``null`` element of a
    string, number or bool at its zero value (``["x", null]`` is
    ``["x", ""]``); so does this decoder, so that rules never meet a None
    where the engine has a value."""
    if value is None and isinstance(shape, Scalar):
        return shape.zero
    return shape.decode(value, where, depth)


class List(Shape):
    def __init__(self, elem: Shape, max_len: int | None = None):
        self.elem = elem
        self.max_len = max_len

    def decode(self, value, where, depth=0):
        if value is None:
            return None
        if not isinstance(value, list) or isinstance(value, _Pairs):
            raise _type_error(where, "a list")
        if depth > _DEPTH_LIMIT:
            raise BadRequest(f"{where}: nested too deeply")
        return [_element(self.elem, v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]


class Map(Shape):
    """A Go map with string keys: keys are exact, a repeated key is refused."""

    def __init__(self, elem: Shape):
        self.elem = elem

    def decode(self, value, where, depth=0):
        if value is None:
            return None
        if not isinstance(value, _Pairs):
            raise _type_error(where, "an object")
        if depth > _DEPTH_LIMIT:
            raise BadRequest(f"{where}: nested too deeply")
        out: dict[str, Any] = {}
        for k, v in value:
            if k in out:
                raise BadRequest(f"{where}: key {k!r} appears twice")
            out[k] = _element(self.elem, v, f"{where}[{k!r}]", depth + 1)
        return out


class Field:
    """A struct field: its JSON name, its shape, and optionally a reason it is
    refused whenever it is set (``refuse``)."""

    def __init__(self, name: str, shape: Shape, refuse: str | None = None, always: bool = False):
        self.name = name
        self.shape = shape
        self.refuse = refuse
        #: refuse the key even when its value is the zero value
        self.always = always


class Struct(Shape):
    """A Go struct, after Go's embedding rules have been applied (promoted
    fields listed flat)."""

    def __init__(self, name: str, fields: list[Field]):
        self.name = name
        self.fields: dict[str, Field] = {}
        for f in fields:
            folded = gofold(f.name)
            assert folded is not None and folded not in self.fields, (name, f.name)
            self.fields[folded] = f

    def decode(self, value, where, depth=0):
        if value is None:
            return None
        if not isinstance(value, _Pairs):
            raise _type_error(where or "body", "a JSON object")
        if depth > _DEPTH_LIMIT:
            raise BadRequest(f"{where}: nested too deeply")
        out: dict[str, Any] = {}
        for key, v in value:
            folded = gofold(key)
            field = self.fields.get(folded) if folded is not None else None
            place = f"{where}.{key}" if where else key
            if field is None:
                raise BadRequest(f"{place} is not a field the engine knows; refused")
            if field.name in out:
                raise BadRequest(
                    f"{place}: the field {field.name} is given more than once (keys that differ only in case count as the same)"
                )
            decoded = field.shape.decode(v, f"{where}.{field.name}" if where else field.name, depth + 1)
            if field.refuse and (field.always or decoded not in (None, False, 0, "", [], {})):
                raise BadRequest(f"{where + '.' if where else ''}{field.name} {field.refuse}")
            out[field.name] = decoded
        return out


def decode(body: bytes | str | None, shape: Shape, what: str = "body") -> dict[str, Any]:
    """Parse ``body`` and decode it into ``shape``; an absent body is refused."""
    if body is None or (isinstance(body, (bytes, str)) and not body.strip()):
        raise BadRequest(f"this request needs a JSON {what} and none reached the plugin "
                         "(missing, not application/json, or over the engine's 1 MiB limit)")
    value = parse(body, what)
    if value is None:
        raise BadRequest(f"{what} is null")
    return shape.decode(value, "")
