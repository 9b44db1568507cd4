"""The Condition element of IAM policies: parsing condition blocks and testing them.

Owns the condition operators (String*, Numeric*, Date*, Bool, BinaryEquals, IpAddress,
NotIpAddress, Arn*, Null), their `...IfExists` forms and the `ForAllValues:` /
`ForAnyValue:` set qualifiers, the request-context key normalisation they rely on, and the
`*`/`?` wildcard matcher that Action, Resource, StringLike and ArnLike share.

Pure: no I/O, no clock (aws:CurrentTime arrives in the context like any other key), no
logging. Parsing raises plain ValueError with a message for the policy author; the caller
(`kmsd.auth.policy`) turns it into MalformedPolicyDocumentException.

Sources (IAM User Guide):
  OPS   reference_policies_elements_condition_operators.html
  SETS  reference_policies_multi-value-conditions.html
  COND  reference_policies_elements_condition.html ("Context key names are not
        case-sensitive")
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from types import MappingProxyType
from typing import Any

# What a request context may carry. A list is a multivalued key (kms:EncryptionContextKeys,
# aws:TagKeys, kms:GrantOperations, kms:ResourceAliases); None means "not in the request".
ContextValue = str | Sequence[str] | bool | int | datetime | bytes | None

FOR_ALL_VALUES = "ForAllValues"
FOR_ANY_VALUE = "ForAnyValue"
_VARIABLE = re.compile(r"\$\{[^}]*\}")


@lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def wildcard_match(pattern: str, value: str) -> bool:
    """IAM's glob: `*` is any run of characters (colons included), `?` exactly one."""
    return _glob(pattern).fullmatch(value) is not None


def _arn_match(pattern: str, value: str) -> bool:
    # OPS, "ARN condition operators": each of the six colon-delimited components is matched
    # separately, so `*` never swallows a colon of the first five; the resource part may
    # itself contain colons.
    p, v = pattern.split(":", 5), value.split(":", 5)
    return len(p) == len(v) == 6 and all(map(wildcard_match, p, v))


# --- value conversions: policy side raises ValueError, context side returns None ---------

def _policy_str(raw: object) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float | str):
        return str(raw)
    raise ValueError


def _ctx_str(raw: object) -> str | None:
    if isinstance(raw, datetime):
        return _utc(raw).isoformat().replace("+00:00", "Z")
    return None if isinstance(raw, bytes) else _policy_str(raw)


def _ctx_lower(raw: object) -> str | None:
    text = _ctx_str(raw)
    return None if text is None else text.lower()


def _decimal(raw: object) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str | Decimal):
        raise ValueError
    try:
        number = Decimal(str(raw).strip())
    except InvalidOperation:
        raise ValueError from None
    if not number.is_finite():
        raise ValueError
    return number


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _date(raw: object) -> datetime:
    # OPS, "Date condition operators": W3C ISO 8601 forms or epoch (UNIX) seconds.
    if isinstance(raw, datetime):
        return _utc(raw)
    try:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return datetime.fromtimestamp(raw, UTC)
        if isinstance(raw, str):
            if re.fullmatch(r"-?\d+(\.\d+)?", raw.strip()):
                return datetime.fromtimestamp(float(raw), UTC)
            return _utc(datetime.fromisoformat(raw.strip()))
    except (OverflowError, OSError):
        raise ValueError from None
    raise ValueError


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise ValueError


def _binary(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if not isinstance(raw, str):
        raise ValueError
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise ValueError from None


def _network(raw: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # OPS, "IP address condition operators": CIDR; a bare address means /32 (or /128).
    if not isinstance(raw, str):
        raise ValueError
    return ipaddress.ip_network(raw.strip(), strict=False)


def _address(raw: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(raw, str):
        raise ValueError
    return ipaddress.ip_address(raw.strip())


def _lenient(convert: Callable[[object], Any]) -> Callable[[object], Any]:
    """A context value the operator cannot read simply matches nothing."""
    def read(raw: object) -> Any:
        try:
            return convert(raw)
        except ValueError:
            return None
    return read


@dataclass(frozen=True)
class _Operator:
    parse: Callable[[object], Any]    # policy value -> typed value (raises ValueError)
    read: Callable[[object], Any]     # context value -> typed value, or None
    test: Callable[[Any, Any], bool]  # (context value, policy value)
    negated: bool = False             # "Not" operators: true when no policy value matches
    variables: bool = False           # OPS lists which operators accept policy variables


def _ops() -> dict[str, _Operator]:
    string = _Operator(_policy_str, _lenient(_ctx_str), operator.eq, variables=True)
    lower = _Operator(lambda r: _policy_str(r).lower(), _lenient(_ctx_lower), operator.eq,
                      variables=True)
    like = _Operator(_policy_str, _lenient(_ctx_str), lambda v, p: wildcard_match(p, v),
                     variables=True)
    arn = _Operator(_policy_str, _lenient(_ctx_str), lambda v, p: _arn_match(p, v),
                    variables=True)
    ip = _Operator(_network, _lenient(_address), lambda v, p: v in p)
    ops = {
        "StringEquals": string, "StringEqualsIgnoreCase": lower, "StringLike": like,
        "ArnEquals": arn, "ArnLike": arn, "IpAddress": ip,
        "Bool": _Operator(_bool, _lenient(_bool), operator.eq),
        "BinaryEquals": _Operator(_binary, _lenient(_binary), operator.eq),
    }
    compare = {"Equals": operator.eq, "LessThan": operator.lt, "LessThanEquals": operator.le,
               "GreaterThan": operator.gt, "GreaterThanEquals": operator.ge}
    for family, convert in (("Numeric", _decimal), ("Date", _date)):
        for suffix, test in compare.items():
            ops[family + suffix] = _Operator(convert, _lenient(convert), test)
        ops[family + "NotEquals"] = _Operator(convert, _lenient(convert), operator.eq, True)
    negations = {"StringNotEquals": string, "StringNotEqualsIgnoreCase": lower,
                 "StringNotLike": like, "ArnNotEquals": arn, "ArnNotLike": arn,
                 "NotIpAddress": ip}
    for name, positive in negations.items():
        ops[name] = _Operator(positive.parse, positive.read, positive.test, True,
                              positive.variables)
    return ops


_OPERATORS = _ops()
# Operator names are matched without regard to case: accepting a superset of what AWS
# accepts never breaks a policy written for AWS.
_BY_LOWER = {name.lower(): name for name in [*_OPERATORS, "Null"]}


@dataclass(frozen=True)
class Condition:
    """One (operator, context key) pair of a Condition block; its values are ORed."""

    operator: str                # as written in the policy, for messages
    base: str                    # canonical operator without qualifier/IfExists
    qualifier: str | None        # FOR_ALL_VALUES, FOR_ANY_VALUE or None
    if_exists: bool
    key: str                     # lower-cased context key name
    values: tuple[Any, ...]      # parsed policy values
    has_variable: bool           # a ${...} policy variable we do not substitute


def _split_operator(name: str) -> tuple[str, str | None, bool]:
    qualifier = None
    rest = name
    if ":" in name:
        prefix, rest = name.split(":", 1)
        qualifier = {"forallvalues": FOR_ALL_VALUES,
                     "foranyvalue": FOR_ANY_VALUE}.get(prefix.lower())
        if qualifier is None:
            raise ValueError(f"Unknown condition set qualifier {prefix!r} in {name!r}; "
                             "use ForAllValues or ForAnyValue")
    if_exists = rest.lower().endswith("ifexists") and rest.lower() != "ifexists"
    base = _BY_LOWER.get(rest[: -len("IfExists")].lower() if if_exists else rest.lower())
    if base is None:
        raise ValueError(f"Unknown condition operator {name!r}")
    if base == "Null" and if_exists:
        # OPS, "...IfExists condition operators": any operator "except the Null condition".
        raise ValueError("The Null condition operator cannot be used with IfExists")
    return base, qualifier, if_exists


def parse_condition_block(block: object, variables: bool) -> tuple[Condition, ...]:
    """Parse a statement's Condition element; `variables` is true for 2012-10-17 policies."""
    if not isinstance(block, dict):
        raise ValueError("Condition must be an object of condition operators")
    conditions = []
    for name, keys in block.items():
        base, qualifier, if_exists = _split_operator(name)
        if not isinstance(keys, dict) or not keys:
            raise ValueError(f"Condition operator {name!r} must map context keys to values")
        for key, raw in keys.items():
            items = raw if isinstance(raw, list) else [raw]
            if not items or any(isinstance(v, dict | list) or v is None for v in items):
                raise ValueError(f"Condition {name!r} for {key!r} needs one or more "
                                 "string, number or boolean values")
            parse = _bool if base == "Null" else _OPERATORS[base].parse
            try:
                values = tuple(parse(v) for v in items)
            except ValueError:
                raise ValueError(f"Invalid value for condition operator {name!r} on "
                                 f"{key!r}: {raw!r}") from None
            has_variable = (variables and base != "Null" and _OPERATORS[base].variables
                            and any(_VARIABLE.search(_policy_str(v)) for v in items))
            conditions.append(Condition(name, base, qualifier, if_exists, key.lower(),
                                        values, has_variable))
    return tuple(conditions)


def normalize_context(context: Mapping[str, ContextValue]) -> Mapping[str, Any]:
    """Lower-case key names (COND: they are case-insensitive), lists to tuples, drop None.

    Two request keys that differ only in case (encryption context `Tenant` and `tenant`,
    both legal in KMS) are merged into one multivalued key rather than one hiding the other.
    """
    out: dict[str, Any] = {}
    for name, value in context.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = tuple(value)
        key = name.lower()
        if key in out:
            before = out[key] if isinstance(out[key], tuple) else (out[key],)
            value = before + (value if isinstance(value, tuple) else (value,))
        out[key] = value
    return MappingProxyType(out)


def condition_holds(cond: Condition, context: Mapping[str, Any]) -> bool:
    """Evaluate one condition against a normalised context (see `normalize_context`)."""
    raw = context.get(cond.key)
    values = raw if isinstance(raw, tuple) else () if raw is None else (raw,)
    if cond.base == "Null":
        # OPS, "Condition operator to check existence of condition keys"; an empty list
        # counts as null (SETS: an empty data set).
        return (not values) in cond.values
    op = _OPERATORS[cond.base]
    if not values:
        # OPS: a missing key fails the condition except for negated operators, and
        # IfExists makes it true. SETS: ForAllValues is true on a missing or empty key,
        # ForAnyValue false.
        if cond.if_exists:
            return True
        if cond.qualifier is not None:
            return cond.qualifier == FOR_ALL_VALUES
        return op.negated

    def hit(value: object) -> bool:
        typed = op.read(value)
        return typed is not None and any(op.test(typed, p) for p in cond.values)

    if cond.qualifier == FOR_ALL_VALUES:
        return all(hit(v) != op.negated for v in values)
    if cond.qualifier == FOR_ANY_VALUE:
        return any(hit(v) != op.negated for v in values)
    # Unqualified operator on a multivalued key (a misuse AWS warns about): the key
    # "matches" when any of its values does, and a negated operator needs none to.
    return any(hit(v) for v in values) != op.negated
