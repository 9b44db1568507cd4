"""Request validation for every KMS operation, compiled from botocore's KMS service model.

Owns: turning a decoded JSON 1.1 request body into the operation's input parameters --
type checks (SerializationException), model constraints (ValidationException, in AWS's
exact "N validation error(s) detected: ..." form), base64 blobs decoded to bytes and epoch
timestamps turned into aware UTC datetimes. Unknown members and JSON nulls are dropped, as
AWS JSON services do.

Never does: authorization, key lookup or any semantic check beyond the model; never puts
the value of a blob or of a `sensitive` member (Plaintext, passwords) into a message.

Member paths follow AWS (Coral): member names with the first letter lowercased, joined by
dots; list elements are `<list>.<1-based index>.member`; members of a structure inside a map
value are `<map>.<key>.member.<name>`. Violations of a map's key or scalar value shape are
reported once per aspect at the map, listing the shape's constraints: "Map keys must satisfy
constraint: [...]" / "Map value must satisfy constraint: [...]".
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import botocore.model
import botocore.session

from kmsd.errors import SerializationException, UnknownOperationException, ValidationException

_JSON_KIND = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
              list: "an array", dict: "an object", type(None): "null"}
# Coral's JSON deserializer maps integers onto Java int/long; anything wider cannot be read.
_INT_RANGE = {"integer": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_EXPECTED = {"string": "a string", "blob": "a base64 string", "boolean": "a boolean",
             "integer": "an integer", "long": "an integer", "float": "a number",
             "double": "a number", "timestamp": "a number of epoch seconds",
             "list": "an array", "map": "an object", "structure": "an object"}
_AGGREGATES = ("list", "map", "structure")

Check = tuple[Callable[[Any], bool], str]


def _java(value: Any) -> str:
    """A value the way Coral's messages print it (Java toString of the deserialized value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_java(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_java(v)}" for k, v in value.items()) + "}"
    return str(value)


def _violation(value: Any, path: str, text: str, secret: bool) -> str:
    shown = " null" if value is None else "" if secret else f" '{_java(value)}'"
    return f"Value{shown} at '{path}' failed to satisfy constraint: {text}"


def _wrong_type(path: str, type_name: str, value: Any) -> SerializationException:
    found = _JSON_KIND.get(type(value), "a value of another type")
    where = f"member '{path}'" if path else "the request body"
    return SerializationException(
        f"Expected {_EXPECTED[type_name]} for {where}, found {found}.")


class _Node:
    """One compiled shape: `convert` type-checks and decodes, `checks` are its own constraints."""

    __slots__ = ("type_name", "secret", "checks", "convert")

    def __init__(self, shape: botocore.model.Shape) -> None:
        self.type_name = shape.type_name
        # Structures print as Java beans in AWS messages: meaningless, and may hold secrets.
        self.secret = (shape.type_name in ("blob", "structure")
                       or bool(shape.metadata.get("sensitive")))
        self.checks: tuple[Check, ...] = _constraints(shape)
        self.convert: Callable[[Any, str, list[str]], Any] = _scalar(shape.type_name)

    def check(self, raw: Any, path: str, errors: list[str]) -> Any:
        value = self.convert(raw, path, errors)
        for failed, text in self.checks:
            if failed(value):
                errors.append(_violation(raw, path, text, self.secret))
        return value


def _constraints(shape: botocore.model.Shape) -> tuple[Check, ...]:
    md, checks = shape.metadata, []
    numeric = shape.type_name in ("integer", "long", "float", "double")
    kind = "value" if numeric else "length"
    # AWS lists the upper bound first; a length minimum of 0 can never fail. String lengths
    # count code points (Smithy's rule), blob lengths the decoded bytes.
    if "max" in md:
        hi = md["max"]
        over = (lambda v: v > hi) if numeric else (lambda v: len(v) > hi)
        checks.append((over, f"Member must have {kind} less than or equal to {hi}"))
    if "min" in md and (numeric or md["min"] > 0):
        lo = md["min"]
        under = (lambda v: v < lo) if numeric else (lambda v: len(v) < lo)
        checks.append((under, f"Member must have {kind} greater than or equal to {lo}"))
    if "pattern" in md:
        # Model patterns are Java regexes, matched in full; re.ASCII gives \w, \d, \s Java's
        # ASCII meaning. A pattern Python cannot compile is skipped rather than guessed at.
        try:
            rx = re.compile(md["pattern"], re.ASCII)
        except re.error:
            pass
        else:
            checks.append((lambda v: rx.fullmatch(v) is None,
                           f"Member must satisfy regular expression pattern: {md['pattern']}"))
    if "enum" in md:
        allowed = frozenset(md["enum"])
        checks.append((lambda v: v not in allowed,
                       f"Member must satisfy enum value set: [{', '.join(md['enum'])}]"))
    return tuple(checks)


def _scalar(type_name: str) -> Callable[[Any, str, list[str]], Any]:
    if type_name == "blob":
        def convert(v: Any, path: str, errors: list[str]) -> Any:
            if type(v) is str:
                # strict_mode still lets excess padding ("QUJD=") through; the length test
                # closes that, so only canonical padded base64 is accepted.
                try:
                    if not len(v) & 3:
                        return binascii.a2b_base64(v, strict_mode=True)
                except ValueError:  # binascii.Error, and non-ASCII text
                    pass
                raise SerializationException(f"Value at '{path}' is not valid base64.")
            raise _wrong_type(path, type_name, v)
    elif type_name == "timestamp":
        def convert(v: Any, path: str, errors: list[str]) -> Any:
            if type(v) in (int, float):
                try:
                    return datetime.fromtimestamp(v, UTC)
                except (OverflowError, OSError, ValueError):  # NaN, inf, out of range
                    raise SerializationException(
                        f"Value at '{path}' is not a valid timestamp.") from None
            raise _wrong_type(path, type_name, v)
    else:
        accepted = {"string": (str,), "boolean": (bool,), "integer": (int,), "long": (int,),
                    "float": (int, float), "double": (int, float)}.get(type_name, ())
        lo, hi = _INT_RANGE.get(type_name, (None, None))

        def convert(v: Any, path: str, errors: list[str]) -> Any:
            # type() rather than isinstance(): JSON true must not pass for an integer.
            if type(v) not in accepted:
                raise _wrong_type(path, type_name, v)
            if lo is not None and not lo <= v <= hi:
                raise SerializationException(f"Value at '{path}' is out of range for "
                                             f"{type_name}.")
            return v
    return convert


class _Compiler:
    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}

    def node(self, shape: botocore.model.Shape) -> _Node:
        if shape.name in self._nodes:
            return self._nodes[shape.name]
        node = self._nodes[shape.name] = _Node(shape)  # registered first: shapes may recurse
        if shape.type_name == "structure":
            node.convert = self._structure(shape)
        elif shape.type_name == "list":
            node.convert = self._list(shape, node)
        elif shape.type_name == "map":
            node.convert = self._map(shape, node)
        return node

    def _structure(self, shape: botocore.model.StructureShape) -> Callable[..., dict[str, Any]]:
        required = set(shape.required_members)
        members = [(m.serialization.get("name", name), name, name[:1].lower() + name[1:],
                    self.node(m), name in required) for name, m in shape.members.items()]

        def convert(v: Any, path: str, errors: list[str]) -> dict[str, Any]:
            if type(v) is not dict:
                raise _wrong_type(path, "structure", v)
            out: dict[str, Any] = {}
            for wire, name, lname, node, is_required in members:
                raw = v.get(wire)
                if raw is None and not is_required:
                    continue
                sub = f"{path}.{lname}" if path else lname
                if raw is None:
                    errors.append(_violation(None, sub, "Member must not be null", False))
                else:
                    out[name] = node.check(raw, sub, errors)
            return out
        return convert

    def _list(self, shape: botocore.model.ListShape, node: _Node) -> Callable[..., list[Any]]:
        member = self.node(shape.member)
        node.secret = node.secret or member.secret or member.type_name in _AGGREGATES

        def convert(v: Any, path: str, errors: list[str]) -> list[Any]:
            if type(v) is not list:
                raise _wrong_type(path, "list", v)
            out = []
            for i, raw in enumerate(v, 1):
                if raw is None:
                    errors.append(_violation(None, f"{path}.{i}.member",
                                             "Member must not be null", False))
                else:
                    out.append(member.check(raw, f"{path}.{i}.member", errors))
            return out
        return convert

    def _map(self, shape: botocore.model.MapShape, node: _Node) -> Callable[..., dict[str, Any]]:
        key, value = self.node(shape.key), self.node(shape.value)
        node.secret = node.secret or key.secret or value.secret or value.type_name in _AGGREGATES
        value_nested = value.type_name in _AGGREGATES

        def aspect(which: str, checks: tuple[Check, ...], extra: list[str]) -> str:
            texts = ", ".join([text for _, text in checks] + extra)
            return f"Map {which} must satisfy constraint: [{texts}]"

        def convert(v: Any, path: str, errors: list[str]) -> dict[str, Any]:
            if type(v) is not dict:
                raise _wrong_type(path, "map", v)
            out: dict[str, Any] = {}
            bad_key = bad_value = has_null = False
            for k, raw in v.items():
                key.convert(k, path, errors)
                if key.checks and not bad_key:
                    bad_key = any(failed(k) for failed, _ in key.checks)
                if raw is None:
                    bad_value = has_null = True
                    continue
                # Coral reports scalar map values once at the map, but descends into
                # aggregate values with a `<map>.<key>.member` path.
                sub = f"{path}.{k}.member" if value_nested else path
                out[k] = converted = value.convert(raw, sub, errors)
                if value.checks and not bad_value:
                    bad_value = any(failed(converted) for failed, _ in value.checks)
            if bad_key:
                errors.append(_violation(v, path, aspect("keys", key.checks, []), node.secret))
            if bad_value:
                extra = ["Member must not be null"] if has_null else []
                errors.append(_violation(v, path, aspect("value", value.checks, extra),
                                         node.secret))
            return out
        return convert


class RequestValidator:
    """Validates and decodes JSON 1.1 request bodies for every operation of the KMS model."""

    def __init__(self, service_model: botocore.model.ServiceModel | None = None) -> None:
        if service_model is None:
            service_model = botocore.session.get_session().get_service_model("kms")
        compiler = _Compiler()
        self._inputs: dict[str, _Node | None] = {}
        for name in service_model.operation_names:
            shape = service_model.operation_model(name).input_shape
            self._inputs[name] = compiler.node(shape) if shape is not None else None
        self._names = frozenset(self._inputs)

    @property
    def operation_names(self) -> frozenset[str]:
        return self._names

    def validate(self, operation: str, body: object) -> dict[str, Any]:
        try:
            node = self._inputs[operation]
        except KeyError:
            raise UnknownOperationException(f"Unknown operation {operation!r}.") from None
        if type(body) is not dict:
            raise _wrong_type("", "structure", body)
        if node is None:
            return {}
        errors: list[str] = []
        params = node.convert(body, "", errors)
        if errors:
            n = len(errors)
            raise ValidationException(f"{n} validation error{'s' if n > 1 else ''} detected: "
                                      + "; ".join(errors))
        return params
