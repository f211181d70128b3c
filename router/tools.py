"""Tool calling, the request side: `tools` for the chat template, `tool_choice` for the answer.

  1. `tools` (OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]
     on HTTP, `GenerateRequest.tools` on gRPC) are checked — names [A-Za-z0-9_-]{1,64} and unique,
     parameters a JSON schema object — and given to the model's chat template (router/chat.py);
  2. `tool_choice` says what the answer is (HTTP: default "auto" with tools, "none" without; gRPC:
     unset is "auto" where the server has a parser, else "none", as its answers were text before):
     - "none": free text; the template still shows the tools;
     - a named function F (HTTP {"type": "function", "function": {"name": F}}, gRPC
       `ToolChoice.function`): F's arguments, held to F's `parameters` by a grammar (structured
       outputs), whatever the template or the model knows of tools;
     - "required": a JSON list of one or more {"name", "parameters"} calls (exactly one with
       `parallel_tool_calls: false`), held to a grammar made of every tool's schema;
     - "auto": free text that `server.tool_call_parser` reads calls from (without one: refused, as
       vLLM does);
  3. router/tool_calls.py reads the answer's text into calls as it streams (HTTP `tool_calls`,
     gRPC `parsed.tool_calls`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from protos.pdserve.v1 import generation_pb2 as pb
from router.errors import BadRequest, InvalidArgument

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolMode:
    """How a chat answer becomes tool calls (router/tool_calls.py reads it)."""

    kind: Literal["named", "required", "auto"]
    names: tuple[str, ...]  # the request's tools
    name: str = ""  # named: the function
    parser: str = ""  # auto: server.tool_call_parser
    parallel: bool = True  # parallel_tool_calls: false keeps the first call only
    param: str = "tools"  # the HTTP field a refusal of its grammar names
    schemas: tuple[str, ...] = field(default=(), compare=False)  # auto: each tool's parameters (JSON text; "": none)


def template_tools(req: pb.GenerateRequest) -> list[dict[str, Any]]:
    """`req.tools` as the chat template reads them (OpenAI's shape), or InvalidArgument naming one."""
    seen: set[str] = set()
    out = []
    for i, t in enumerate(req.tools):
        if not NAME.fullmatch(t.name):
            raise InvalidArgument(f"tools[{i}].name", f"{t.name!r} must be 1-64 of A-Z, a-z, 0-9, _ and -")
        if t.name in seen:
            raise InvalidArgument(f"tools[{i}].name", f"{t.name!r} is given twice")
        seen.add(t.name)
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        fn["parameters"] = parameters(t, f"tools[{i}].parameters")
        out.append({"type": "function", "function": fn})
    return out


def parameters(t: pb.Tool, field: str) -> dict[str, Any]:
    if not t.parameters:
        return dict(NO_ARGUMENTS)
    try:
        schema = json.loads(t.parameters)
    except (json.JSONDecodeError, RecursionError) as e:
        raise InvalidArgument(field, f"not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument(field, "must be a JSON schema (an object)")
    return schema


# -- HTTP ----------------------------------------------------------------------------------------
def tools_from_http(body: dict[str, Any], req: pb.GenerateRequest) -> None:
    """`tools` into `req.tools` (chat completions and /tokenize)."""
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise BadRequest("each tool must be {\"type\": \"function\", \"function\": {...}}", f"tools[{i}]")
        unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise BadRequest(f"unsupported field: {unknown[0]}", f"tools[{i}].function.{unknown[0]}",
                             code="unsupported_parameter")
        name, desc, params = fn.get("name"), fn.get("description") or "", fn.get("parameters")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadRequest("name must be 1-64 of A-Z, a-z, 0-9, _ and -", f"tools[{i}].function.name")
        if not isinstance(desc, str):
            raise BadRequest("description must be a string", f"tools[{i}].function.description")
        if params is not None and not isinstance(params, dict):
            raise BadRequest("parameters must be a JSON schema (an object)", f"tools[{i}].function.parameters")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise BadRequest("strict must be a boolean", f"tools[{i}].function.strict")
        req.tools.add(name=name, description=desc, parameters=json.dumps(params) if params is not None else "")


def tool_mode(body: dict[str, Any], req: pb.GenerateRequest, structured: str | None,
              parser: str | None) -> ToolMode | None:
    """`tool_choice` (and `parallel_tool_calls`): None for free text, else how the answer becomes
    calls; a named function or "required" sets `req.structured` (so no other structured output)."""
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be a boolean", "parallel_tool_calls", code="invalid_type")
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(CHOICES, "tool_choice")
        kind, name, name_field = "named", fn["name"], "tool_choice.function.name"
    elif choice is None or choice in ("none", "required", "auto"):
        kind, name, name_field = choice, "", ""
    else:
        raise BadRequest(CHOICES, "tool_choice")
    try:
        return _mode(kind, name, name_field, req, structured, parser, parallel is not False,
                     lambda i: f"tools[{i}].function.parameters")
    except InvalidArgument as e:
        raise BadRequest(str(e), e.field) from None


def grpc_tool_mode(req: pb.GenerateRequest, parser: str | None) -> ToolMode | None:
    """gRPC's `tool_choice` and `parallel_tool_calls`, as tool_mode() reads HTTP's."""
    which = req.tool_choice.WhichOneof("kind") if req.HasField("tool_choice") else None
    if which == "mode" and req.tool_choice.mode not in ("none", "auto", "required"):
        raise InvalidArgument("tool_choice.mode", f"{req.tool_choice.mode!r} is not none, auto or required")
    kind = None if which is None else "named" if which == "function" else req.tool_choice.mode
    if kind is None and req.tools:  # unset: read calls where the server can
        kind = "none" if parser is None else "auto"
    structured = "structured" if req.HasField("structured") else None
    return _mode(kind, req.tool_choice.function, "tool_choice.function", req, structured, parser,
                 not req.HasField("parallel_tool_calls") or req.parallel_tool_calls,
                 lambda i: f"tools[{i}].parameters")


CHOICES = 'tool_choice must be none, auto, required or {"type": "function", "function": {"name": ...}}'


def _mode(kind: str | None, name: str, name_field: str, req: pb.GenerateRequest, structured: str | None,
          parser: str | None, parallel: bool, params_field: Callable[[int], str]) -> ToolMode | None:
    """Either front's tool choice (`kind` None: not given) → the ToolMode, or InvalidArgument.
    `structured`: the field of a structured output the request also sets."""
    names = tuple(t.name for t in req.tools)
    if not names:
        if kind not in (None, "none"):
            raise InvalidArgument("tool_choice", "needs tools")
        return None
    if kind is None:
        kind = "auto"
    if kind == "none":
        return None
    if kind == "named" and name not in names:
        raise InvalidArgument(name_field, f"names {name!r}, which is not among tools")
    if parser == "harmony" and kind in ("named", "required"):  # its grammar would hold the whole answer
        raise InvalidArgument("tool_choice", f"{kind!r} is not supported with server.tool_call_parser harmony "
                                             '(gpt-oss\'s channels); send "auto" or "none"')
    if kind == "auto":
        if parser is None:
            raise InvalidArgument("tool_choice", '"auto" needs server.tool_call_parser, which this server does not '
                                                 'set; send "required", a named function or "none"')
        if not req.HasField("skip_special_tokens"):
            req.skip_special_tokens = False  # a parser's markers (<tool_call>) may be special tokens
        return ToolMode("auto", names, parser=parser, parallel=parallel,
                        schemas=tuple(t.parameters for t in req.tools))
    if structured:
        raise InvalidArgument(structured.split(".")[0], f"tool_choice {kind!r} holds the answer to the tools' "
                                                        f"schemas; it cannot be combined with {structured}")
    i = names.index(name) if name else 0
    req.structured.json_schema = json.dumps(
        parameters(req.tools[i], params_field(i)) if kind == "named" else _calls_schema(req.tools, parallel,
                                                                                       params_field))
    return ToolMode(kind, names, name=name, parallel=parallel, param=params_field(i) if kind == "named" else "tools")


def _calls_schema(tools: Any, parallel: bool, params_field: Callable[[int], str]) -> dict[str, Any]:
    """"required": a list of calls, each one tool's name and its arguments (vLLM's shape)."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name},
                                              "parameters": parameters(t, params_field(i))},
              "required": ["name", "parameters"], "additionalProperties": False}
             for i, t in enumerate(tools)]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def message_tool_fields(m: dict[str, Any], i: int, msg: pb.ChatMessage) -> None:
    """An HTTP message's `tool_calls` (assistant), `tool_call_id` (tool), `name` and an assistant's
    earlier thinking (`reasoning`, or `reasoning_content` as DeepSeek's clients send it) into `msg`."""
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant" or not isinstance(calls, list):
            raise BadRequest("tool_calls is a list, on assistant messages", f"messages[{i}].tool_calls")
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                    or not isinstance(fn.get("arguments", ""), str) or not isinstance(c.get("id", ""), str)):
                raise BadRequest("each tool call is {\"id\", \"type\": \"function\", \"function\": {\"name\", "
                                 "\"arguments\": JSON text}}", f"messages[{i}].tool_calls[{j}]")
            msg.tool_calls.add(id=c.get("id", ""), name=fn["name"], arguments=fn.get("arguments", ""))
    for key, attr in (("tool_call_id", "tool_call_id"), ("name", "name"), ("reasoning", "reasoning"),
                      ("reasoning_content", "reasoning")):
        v = m.get(key)
        if v is not None:
            if not isinstance(v, str):
                raise BadRequest(f"{key} must be a string", f"messages[{i}].{key}")
            setattr(msg, attr, v)
    if m["role"] == "tool" and not msg.tool_call_id:
        raise BadRequest("a tool message needs the tool_call_id it answers", f"messages[{i}].tool_call_id")
