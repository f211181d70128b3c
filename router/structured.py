"""Structured outputs at the router: what the answer must match (engine/structured.py holds it to it).

- gRPC: `GenerateRequest.structured` (one of json_schema, json_object, regex, choice, grammar;
  `starts_after`: the answer is free until that text, a reasoning model's "</think>", and the
  grammar holds the rest: SamplingParams.grammar_after; `free_opener`: the one token, "<think>",
  whose drawing first opens that free part, else the grammar holds the answer at once)
- HTTP, as OpenAI and vLLM take it (one of these per request): `response_format` ({"type":
  "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; "text" is
  free text), vLLM's `structured_outputs` ({"json" | "regex" | "choice" | "grammar" | "json_object":
  ...}) and its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
Both become one grammar text (SamplingParams.grammar), checked here against the tokenizer: a bad
schema, regex or grammar is INVALID_ARGUMENT naming its field (the HTTP field it came from, on HTTP).
With `server.reasoning_parser`, the HTTP front sets both for a chat answer (router/reasoning.py
`think_first`), so a reasoning model thinks before it answers to the grammar.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any

from engine.structured import grammar_error, grammar_text, llguidance_tokenizer
from protos.pdserve.v1 import generation_pb2 as pb
from router.errors import BadRequest, InvalidArgument

HTTP_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
               "guided_grammar")
_KINDS = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
          "grammar": "grammar"}  # vLLM's structured_outputs keys → the wire's

MAX_STARTS_AFTER_CHARS = 64  # the worker decodes this many tokens and more each step until it is written

_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def thinking_of(req: pb.GenerateRequest, tokenizer: Any) -> tuple[str, str]:
    """`req.structured`'s (starts_after, free_opener), checked: the text after which the grammar
    holds the answer, and the one token that may open the free part before it."""
    if not req.HasField("structured"):
        return "", ""
    after, opener = req.structured.starts_after, req.structured.free_opener
    for name, text in (("starts_after", after), ("free_opener", opener)):
        if len(text) > MAX_STARTS_AFTER_CHARS:
            raise InvalidArgument(f"structured.{name}", f"must be at most {MAX_STARTS_AFTER_CHARS} characters, "
                                  f"got {len(text)}")
    if opener and not after:
        raise InvalidArgument("structured.free_opener", "needs structured.starts_after (where the free part ends)")
    if opener and len(tokenizer.encode(opener, add_special_tokens=False)) != 1:
        raise InvalidArgument("structured.free_opener", f"{opener!r} is not one token of the model's tokenizer")
    return after, opener


def grammar_of(req: pb.GenerateRequest, tokenizer: Any) -> str:
    """The grammar of `req.structured` ("" when unset: free text), or InvalidArgument naming the field."""
    if not req.HasField("structured"):
        return ""
    s = req.structured
    kind = s.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("structured", "set one of json_schema, json_object, regex, choice, grammar")
    field = f"structured.{kind}"
    if req.allowed_token_ids:
        raise InvalidArgument("allowed_token_ids", "cannot be combined with structured (its grammar picks the tokens)")
    spec: Any = getattr(s, kind)
    if kind == "json_object" and not spec:
        raise InvalidArgument(field, "must be true (leave structured unset for free text)")
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InvalidArgument(field, f"not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise InvalidArgument(field, "must be a JSON object (a JSON schema)")
    if kind == "choice":
        spec = list(spec.choices)
        if not spec:
            raise InvalidArgument(field, "must list at least one string")
        for i, c in enumerate(spec):
            if not c:
                raise InvalidArgument(f"{field}[{i}]", "must not be empty")
    if kind in ("regex", "grammar") and not spec:
        raise InvalidArgument(field, "must not be empty")
    try:
        grammar = grammar_text(kind, spec)
    except ValueError as e:
        raise InvalidArgument(field, str(e)) from None
    error = grammar_error(grammar, _llguidance_tokenizer(tokenizer))
    if error:
        raise InvalidArgument(field, error.strip())
    return grammar


def _llguidance_tokenizer(tokenizer: Any) -> Any:
    """Built once per tokenizer (~0.4 s at 49k tokens), at the first request that needs it."""
    with _lock:
        ll = _tokenizers.get(tokenizer)
        if ll is None:
            ll = _tokenizers[tokenizer] = llguidance_tokenizer(tokenizer, len(tokenizer))
        return ll


def from_http(body: dict[str, Any], req: pb.GenerateRequest) -> str | None:
    """The body's structured output into `req.structured`; → the HTTP field it came from (what a
    refusal of it names), or None when the answer is free text."""
    given = [name for name in HTTP_FIELDS if body.get(name) is not None]
    if len(given) > 1:
        raise BadRequest(f"give one of {', '.join(given)}", given[1])
    if not given:
        return None
    name, value = given[0], body[given[0]]
    if name == "response_format":
        return _response_format(value, req)
    if name == "structured_outputs":
        if not isinstance(value, dict):
            raise BadRequest("structured_outputs must be an object", name)
        keys = [k for k in value if value[k] is not None and value[k] is not False]
        unknown = [k for k in keys if k not in _KINDS]
        if unknown:
            raise BadRequest(f"structured_outputs.{unknown[0]} is not supported (json, json_object, regex, choice, "
                             "grammar)", f"structured_outputs.{unknown[0]}", code="unsupported_parameter")
        if len(keys) != 1:
            raise BadRequest("structured_outputs takes one of json, json_object, regex, choice, grammar", name)
        _set(req, _KINDS[keys[0]], value[keys[0]], f"{name}.{keys[0]}")
        return f"{name}.{keys[0]}"
    _set(req, _KINDS[name.removeprefix("guided_")], value, name)
    return name


def _response_format(value: Any, req: pb.GenerateRequest) -> str | None:
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("response_format.type must be text, json_object or json_schema", "response_format")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        req.structured.json_object = True
        return "response_format"
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise BadRequest("response_format.json_schema.schema must be a JSON schema (an object)",
                         "response_format.json_schema.schema")
    _set(req, "json_schema", spec["schema"], "response_format.json_schema.schema")
    return "response_format.json_schema.schema"


def _set(req: pb.GenerateRequest, kind: str, value: Any, param: str) -> None:
    s = req.structured
    if kind == "json_schema":
        if isinstance(value, str):
            s.json_schema = value
        elif isinstance(value, dict):
            s.json_schema = json.dumps(value)
        else:
            raise BadRequest(f"{param} must be a JSON schema (an object, or its JSON text)", param)
    elif kind == "json_object":
        if value is not True:
            raise BadRequest(f"{param} must be true", param)
        s.json_object = True
    elif kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise BadRequest(f"{param} must be a list of strings", param)
        s.choice.choices.extend(value)
    else:
        if not isinstance(value, str):
            raise BadRequest(f"{param} must be a string", param)
        setattr(s, kind, value)
