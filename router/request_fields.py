"""What the OpenAI edge does with each request field it does not simply pass to sampling.

Nothing is silently ignored: a field is either implemented, refused with 400 naming it
(``REFUSED``: refused when set to anything but its no-op values), or in ``NO_EFFECT`` —
fields that by their nature change nothing a server like this one computes. Unknown fields
are refused by the request models (``extra="forbid"``). docs/api.md has the full table.

Structured outputs come from exactly one of ``response_format`` (``json_object``,
``json_schema``; ``text`` is the default), vLLM's ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar``, or vLLM's ``structured_outputs`` object; each is
checked by the grammar engine here, so an invalid schema or regex is a 400 before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.structured import StructuredSpec
from router.errors import InvalidParamError

NO_EFFECT: dict[str, str] = {
    "user": "an end-user id for the provider's abuse monitoring; this server keeps none",
    "safety_identifier": "the same, under its newer name",
    "metadata": "tags for stored completions; nothing is stored",
    "prompt_cache_key": "a cache-routing hint; prefix caching here is automatic, by content",
    "prompt_cache_retention": "how long OpenAI keeps a cached prefix; the prefix cache here "
                              "keeps blocks while memory allows",
}
"""Accepted and without effect, by nature (documented in docs/api.md)."""


def _unset(value: Any) -> bool:
    return value is None


def _is(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in allowed


REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (_is(1), "best_of is not supported (vLLM dropped it too); send n samples "
                        "and pick among them"),
    "suffix": (lambda v: not v, "suffix (fill-in-the-middle) is not supported"),
    "store": (_is(False), "store=true: this server stores no completions"),
    "service_tier": (_is("auto", "default"), "this server has one service tier; send 'auto' "
                                             "or leave service_tier out"),
    "audio": (_unset, "audio output is not supported"),
    "modalities": (_is(["text"]), "only the text modality is supported"),
    "prediction": (_unset, "predicted outputs are not supported"),
    "web_search_options": (_unset, "web search is not supported"),
    "reasoning_effort": (_unset, "reasoning_effort is not supported (no reasoning models)"),
    "verbosity": (_unset, "verbosity is not supported"),
    "moderation": (_unset, "moderation is not supported"),
    "prompt_cache_options": (_unset, "prompt_cache_options is not supported"),
    "functions": (_unset, "functions is deprecated and not supported; send tools"),
    "function_call": (_unset, "function_call is deprecated and not supported; send "
                              "tool_choice"),
}
"""Field -> (the values that are no-ops, why anything else is refused)."""


def check_refused(values: dict[str, Any]) -> None:
    """400 naming the first field set to a value this server cannot honour."""
    for name, (ok, why) in REFUSED.items():
        if name in values and not ok(values[name]):
            raise InvalidParamError(f"{name}: {why}", name)


_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice",
                       "grammar": "grammar"}


def structured_spec(values: dict[str, Any]) -> tuple[StructuredSpec | None, str | None]:
    """(the structured-output spec, the field it came from) from a request's fields."""
    found: list[tuple[str, str, Any]] = []  # (field, kind, spec)
    rf = values.get("response_format")
    if rf is not None:
        kind_spec = _response_format(rf)
        if kind_spec is not None:
            found.append(("response_format", *kind_spec))
    for name, kind in _GUIDED.items():
        if values.get(name) is not None:
            found.append((name, kind, values[name]))
    so = values.get("structured_outputs")
    if so is not None:
        found.append(("structured_outputs", *_structured_outputs(so)))
    if not found:
        return None, None
    if len(found) > 1:
        raise InvalidParamError(f"{found[1][0]}: send one structured-output constraint (got "
                                f"{found[0][0]} and {found[1][0]})", found[1][0])
    name, kind, spec = found[0]
    try:
        return StructuredSpec(kind, spec), name
    except ValueError as exc:
        raise InvalidParamError(f"{name}: {exc}", name) from None


def _response_format(rf: Any) -> tuple[str, Any] | None:
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text" and set(rf) == {"type"}:
        return None
    if kind == "json_object" and set(rf) == {"type"}:
        return "json_object", ""
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str) \
                or set(rf) != {"type", "json_schema"} \
                or set(js) - {"name", "description", "schema", "strict"}:
            raise InvalidParamError("response_format: json_schema needs {\"name\": ..., "
                                    "\"schema\": {...}} (and optionally description, strict)",
                                    "response_format")
        # strict or not, the output is held to the schema (OpenAI's strict behaviour)
        return "json_schema", js.get("schema") or {"type": "object"}
    raise InvalidParamError("response_format must be {\"type\": \"text\"}, {\"type\": "
                            "\"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                            "{...}}", "response_format")


def _structured_outputs(so: Any) -> tuple[str, Any]:
    if not isinstance(so, dict):
        raise InvalidParamError("structured_outputs must be an object", "structured_outputs")
    set_keys = [k for k, v in so.items() if v not in (None, False)]
    unknown = [k for k in set_keys if k not in _STRUCTURED_OUTPUTS and k != "json_object"]
    if unknown:
        raise InvalidParamError(f"structured_outputs.{unknown[0]} is not supported; use json, "
                                "regex, choice, grammar or json_object", "structured_outputs")
    if len(set_keys) != 1:
        raise InvalidParamError("structured_outputs: set exactly one of json, regex, choice, "
                                "grammar, json_object", "structured_outputs")
    key = set_keys[0]
    if key == "json_object":
        return "json_object", ""
    return _STRUCTURED_OUTPUTS[key], so[key]
