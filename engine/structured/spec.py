"""What a structured-output request asks for: ``StructuredSpec``, validated at construction.

Pure Python (no torch): ``SamplingParams`` carries a spec through the router and Ray. The spec
is small, frozen, hashable and picklable; constructing one checks it against the grammar
engine (tokenizer-independent, cached), so an invalid schema, regex or grammar raises
``InvalidStructuredSpec`` (a ValueError naming the kind and the reason) before any work is
scheduled. The router can do exactly that up front: ``StructuredSpec("regex", text)``.

Kinds and their ``spec``:
  json_object   ""                  any JSON object (OpenAI ``response_format: json_object``)
  json_schema   the schema          a dict or its JSON text; stored as canonical JSON text.
                                    Output conforms strictly (properties not in the schema are
                                    refused unless it allows them, as with OpenAI's strict).
  regex         the pattern         the whole output matches it
  choice        the strings         exactly one of them (a sequence of non-empty strings)
  grammar       the grammar text    EBNF (GBNF: ``root ::= ...``) when it contains ``::=``,
                                    otherwise Lark (``start: ...``), as xgrammar reads them
  structural_tag  xgrammar's        free text, except that what follows a trigger is one
                  structural tag    of the tags (begin, JSON-schema content, end): how
                                    strict tool calls are enforced with tool_choice "auto"

JSON output is compact (no free whitespace between tokens): a model cannot stall in an
endless run of spaces, and the text is what ``json.dumps`` would write (``", "``/``": "``).
Inside a structural tag one space at most stands between tokens (``grammar``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from engine.errors import InvalidRequestError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "structural_tag")
MAX_SPEC_CHARS = 100_000
"""Longest spec accepted (schema / regex / grammar text, all choices together)."""


class InvalidStructuredSpec(InvalidRequestError):
    """A structured-output spec the grammar engine refuses (a ValueError; INVALID_ARGUMENT).
    ``kind`` names which field of the request was wrong (the router maps it to
    ``response_format`` / ``guided_regex`` / ...), ``reason`` says why, safe for a client."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"structured output {kind} is invalid: {reason}")


@dataclass(frozen=True)
class StructuredSpec:
    kind: str
    """One of ``KINDS``."""
    spec: str | tuple[str, ...] = ""
    """Schema (canonical JSON text), regex, grammar text, or the tuple of choices."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", _normalise(self.kind, self.spec))
        check(self)

    @property
    def text(self) -> str:
        """The spec as one string (choices JSON-encoded): for logs and cache keys."""
        return json.dumps(list(self.spec)) if self.kind == "choice" else str(self.spec)

    # Shorthands, named after the OpenAI / vLLM request fields.
    @classmethod
    def json_object(cls) -> StructuredSpec:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping | str) -> StructuredSpec:
        return cls("json_schema", schema)  # type: ignore[arg-type]

    @classmethod
    def regex(cls, pattern: str) -> StructuredSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> StructuredSpec:
        return cls("choice", tuple(choices))

    @classmethod
    def grammar(cls, text: str) -> StructuredSpec:
        return cls("grammar", text)

    @classmethod
    def structural_tag(cls, tag: Mapping) -> StructuredSpec:
        return cls("structural_tag", tag)  # type: ignore[arg-type]


def _normalise(kind, spec) -> str | tuple[str, ...]:
    """Shape checks that need no grammar engine; returns the canonical, hashable spec."""
    if kind not in KINDS:
        raise InvalidStructuredSpec(str(kind), f"unknown kind; use one of {', '.join(KINDS)}")
    if kind == "json_object":
        if spec not in ("", None, {}):
            raise InvalidStructuredSpec(kind, "takes no spec")
        return ""
    if kind in ("json_schema", "structural_tag"):
        return _canonical_schema(spec, kind)
    if kind == "choice":
        if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
            raise InvalidStructuredSpec(kind, "must be a non-empty list of strings")
        if not all(isinstance(c, str) and c for c in spec):
            raise InvalidStructuredSpec(kind, "every choice must be a non-empty string")
        if sum(map(len, spec)) > MAX_SPEC_CHARS:
            raise InvalidStructuredSpec(kind, f"longer than {MAX_SPEC_CHARS} characters")
        return tuple(spec)
    if not isinstance(spec, str) or not spec:
        raise InvalidStructuredSpec(kind, "must be a non-empty string")
    if len(spec) > MAX_SPEC_CHARS:
        raise InvalidStructuredSpec(kind, f"longer than {MAX_SPEC_CHARS} characters")
    return spec


def _canonical_schema(schema, kind: str = "json_schema") -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidStructuredSpec(kind, f"not valid JSON ({e.msg})") from None
    if not isinstance(schema, Mapping):
        raise InvalidStructuredSpec(kind, "must be a JSON object")
    try:
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidStructuredSpec(kind, f"not JSON-serialisable ({e})") from None
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidStructuredSpec(kind, f"longer than {MAX_SPEC_CHARS} characters")
    return text


def check(spec: StructuredSpec) -> None:
    """Raise ``InvalidStructuredSpec`` unless the grammar engine accepts ``spec``. Cached per
    spec; the first call imports the grammar engine (about a second)."""
    reason = _grammar_error(spec.kind, spec.spec)
    if reason is not None:
        raise InvalidStructuredSpec(spec.kind, reason)


@lru_cache(maxsize=256)
def _grammar_error(kind: str, spec: str | tuple[str, ...]) -> str | None:
    from engine.structured.grammar import build_grammar, clean_error

    try:
        build_grammar(kind, spec)
    except (RuntimeError, ValueError) as e:  # xgrammar's parse errors are RuntimeErrors
        return clean_error(e)
    return None
