"""Hypothesis strategies for KMS request bodies, built from botocore's service model.

For every member of an operation's input shape the strategy draws a *valid* value
(right type, an enum value, a length or number within the model's bounds, or a value
from the pools of things that exist in the cluster: key ids, ARNs, aliases, grant ids,
ciphertexts), a *boundary* value (just inside and just outside each bound), or an
*invalid* one (another JSON type, an out-of-range number, null). Structures keep
their required members most of the time and sometimes drop them or grow unknown ones.
Values are JSON-ready (blobs as base64 text).

Generated text includes lone UTF-16 surrogates, which kmsd refuses as a
SerializationException (see test_api_fuzz.test_lone_surrogates_are_a_client_error).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import botocore.model
import botocore.session
from hypothesis import strategies as st

MODEL = botocore.session.get_session().get_service_model("kms")
OPERATIONS = tuple(sorted(MODEL.operation_names))
SURROGATES = True
MAX_DEPTH = 4
# Bodies stay well under the node's 1 MiB limit (oversize bodies have their own test).
MAX_LENGTH = 140_000

# Members the model leaves optional that an operation needs: sometimes absent, which
# kmsd answers with a ValidationException (test_api_fuzz covers both).
KNOWN_BUG_MEMBERS: dict[str, str] = {}

_CHARS = st.characters(exclude_categories=()) if SURROGATES else st.characters(codec="utf-8")


@dataclass
class Pools:
    """Things that exist in the cluster, for values that get past validation."""

    key_ids: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    grant_ids: list[str] = field(default_factory=list)
    grant_tokens: list[str] = field(default_factory=list)
    ciphertexts: list[bytes] = field(default_factory=list)
    principals: list[str] = field(default_factory=list)
    contexts: list[dict[str, str]] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)


def text_of_length(n: int) -> st.SearchStrategy[str]:
    """Text of exactly n code points (long ones repeat a short drawn piece)."""
    if n <= 0:
        return st.just("")
    if n <= 64:
        return st.text(_CHARS, min_size=n, max_size=n)
    return st.text(_CHARS, min_size=1, max_size=8).map(lambda s: (s * (n // len(s) + 1))[:n])


def bytes_of_length(n: int) -> st.SearchStrategy[bytes]:
    if n <= 0:
        return st.just(b"")
    if n <= 256:
        return st.binary(min_size=n, max_size=n)
    return st.binary(min_size=16, max_size=64).map(lambda b: (b * (n // len(b) + 1))[:n])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _lengths(shape: botocore.model.Shape, default_max: int) -> st.SearchStrategy[int]:
    lo = shape.metadata.get("min", 0)
    hi = min(shape.metadata.get("max", default_max), MAX_LENGTH)
    inside = st.integers(lo, min(hi, lo + 40))
    edges = st.sampled_from(sorted({max(0, lo - 1), lo, hi, hi + 1}))
    return st.one_of(inside, inside, edges)


WRONG_TYPE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=True, allow_infinity=True),
                       st.text(_CHARS, max_size=8), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(_CHARS, max_size=3), st.integers(), max_size=2))


class Builder:
    def __init__(self, pools: Pools, valid_only: bool = False) -> None:
        self.pools = pools
        # Only valid and known values: requests that get past validation, to the service.
        self.valid_only = valid_only

    # Values for members whose meaning we know: mostly things that exist.
    def _known(self, name: str, shape: botocore.model.Shape) -> st.SearchStrategy[Any] | None:
        p = self.pools
        if name in ("KeyId", "TargetKeyId", "SourceKeyId", "DestinationKeyId") and p.key_ids:
            return st.sampled_from(p.key_ids + p.aliases)
        if name == "AliasName":
            return st.one_of(st.sampled_from(p.aliases or ["alias/none"]),
                             st.from_regex(r"alias/fuzz-[a-zA-Z0-9_-]{1,20}", fullmatch=True),
                             st.sampled_from(["alias/aws/kms", "alias/", "alias", "alias/a/b"]))
        if name == "GrantId" and p.grant_ids:
            return st.sampled_from(p.grant_ids)
        if name == "GrantToken" and p.grant_tokens:
            return st.sampled_from(p.grant_tokens)
        if name in ("GranteePrincipal", "RetiringPrincipal") and p.principals:
            return st.sampled_from(p.principals)
        if name == "Policy" and p.policies:
            return st.sampled_from(p.policies)
        if name == "Plaintext":
            # Random and long enough for the secret scan to look for it afterwards.
            return st.binary(min_size=32, max_size=256).map(_b64)
        if name == "PolicyName":
            return st.sampled_from(["default", "Default", "other"])
        if name in ("CiphertextBlob", "SourceCiphertextBlob") and p.ciphertexts:
            return st.sampled_from(p.ciphertexts).map(_b64)
        if shape.name == "EncryptionContextType" and p.contexts:
            return st.sampled_from(p.contexts)
        if name in ("GranteePrincipal", "RetiringPrincipal"):
            return st.just("arn:aws:iam::111122223333:root")
        return None

    def value(self, shape: botocore.model.Shape, name: str = "", depth: int = 0
              ) -> st.SearchStrategy[Any]:
        """Valid, boundary and invalid values for one member, in about 6:3:1."""
        valid = self._valid(shape, name, depth)
        known = self._known(name, shape)
        if known is not None:
            valid = st.one_of(known, known, valid)
        if self.valid_only:
            return valid
        return st.one_of(*([valid] * 6), *([self._boundary(shape, depth)] * 3), WRONG_TYPE)

    def _valid(self, shape: botocore.model.Shape, name: str, depth: int
               ) -> st.SearchStrategy[Any]:
        md, kind = shape.metadata, shape.type_name
        if kind == "string":
            if "enum" in md:
                return st.sampled_from(md["enum"])
            lo, hi = md.get("min", 0), min(md.get("max", 64), 64)
            return st.text(_CHARS, min_size=lo, max_size=max(lo, hi))
        if kind == "blob":
            lo, hi = md.get("min", 0), min(md.get("max", 64), 64)
            return st.binary(min_size=lo, max_size=max(lo, hi)).map(_b64)
        if kind in ("integer", "long"):
            return st.integers(md.get("min", 0), md.get("max", 2**31 - 1))
        if kind in ("float", "double"):
            return st.floats(md.get("min", 0), md.get("max", 1e9))
        if kind == "boolean":
            return st.booleans()
        if kind == "timestamp":
            return st.integers(0, 4_000_000_000)
        if depth >= MAX_DEPTH:
            return st.builds(list) if kind == "list" else st.builds(dict)
        if kind == "list":
            hi = min(md.get("max", 4), 4)
            return st.lists(self.value(shape.member, name, depth + 1),
                            min_size=md.get("min", 0), max_size=max(md.get("min", 0), hi))
        if kind == "map":
            return st.dictionaries(self.value(shape.key, name, depth + 1),
                                   self.value(shape.value, name, depth + 1), max_size=3)
        return self.structure(shape, depth + 1)

    def _boundary(self, shape: botocore.model.Shape, depth: int) -> st.SearchStrategy[Any]:
        md, kind = shape.metadata, shape.type_name
        if kind == "string":
            if "enum" in md:
                return st.sampled_from([v.lower() for v in md["enum"]] + ["", " "] +
                                       [v + " " for v in md["enum"]])
            return _lengths(shape, 256).flatmap(text_of_length)
        if kind == "blob":
            return _lengths(shape, 256).flatmap(bytes_of_length).map(_b64)
        if kind in ("integer", "long"):
            lo, hi = md.get("min", -(2**31)), md.get("max", 2**31 - 1)
            return st.sampled_from([lo - 1, lo, hi, hi + 1, 0, -1, 2**31, 2**63, -(2**63) - 1])
        if kind == "timestamp":
            return st.sampled_from([-1, 0, 1e20, -1e20, 253402300800, 2**63, 1.5])
        if kind == "boolean":
            return st.sampled_from(["true", 1, 0, "false"])
        if kind == "list":
            return st.lists(st.none(), min_size=1, max_size=2) if depth < MAX_DEPTH \
                else st.just([])
        if kind == "map":
            return st.sampled_from([{"": ""}, {"k": None}, {"k" * 3000: "v"}, {"k": ["v"]}])
        return st.sampled_from([{}, [], "", {"Unknown": 1}])

    def structure(self, shape: botocore.model.StructureShape, depth: int = 0
                  ) -> st.SearchStrategy[dict[str, Any]]:
        required = set(shape.required_members)

        @st.composite
        def draw(draw_: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, member in shape.members.items():
                keep = draw_(st.integers(0, 99))
                if (name in required and (keep < 92 or self.valid_only)) or \
                        (name not in required and keep < 45):
                    out[member.serialization.get("name", name)] = draw_(
                        self.value(member, name, depth))
            if not self.valid_only and draw_(st.integers(0, 19)) == 0:
                out[draw_(st.text(_CHARS, min_size=1, max_size=12))] = draw_(WRONG_TYPE)
            return out
        return draw()

    def body(self, operation: str) -> st.SearchStrategy[bytes]:
        """A request body: one time in three well-formed throughout, else hostile."""
        if not self.valid_only:
            return st.one_of(self._body(operation), self._body(operation),
                             Builder(self.pools, valid_only=True)._body(operation))
        return self._body(operation)

    def _body(self, operation: str) -> st.SearchStrategy[bytes]:
        shape = MODEL.operation_model(operation).input_shape
        members = self.structure(shape) if shape is not None else st.just({})
        if operation in KNOWN_BUG_MEMBERS:
            name = KNOWN_BUG_MEMBERS[operation]
            members = st.tuples(members, st.sampled_from(self.pools.principals or ["*"])).map(
                lambda pair: {**pair[0], name: pair[0].get(name) or pair[1]})
        return members.map(lambda v: json.dumps(v).encode())
