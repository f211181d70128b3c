"""POST /v1/responses — OpenAI's Responses API — over the chat path.

  1. the request becomes the Chat Completions body it stands for (`chat_body`): `instructions` a
     system message first; `input` (a string, or items: messages, earlier `function_call`s and their
     `function_call_output`s, `reasoning` kept for the next assistant turn) the messages; function
     `tools`, `tool_choice`, `text.format` (a structured output), `reasoning.effort`,
     `max_output_tokens` theirs. What has no chat equivalent here (stored responses:
     `previous_response_id`; `background`; built-in tools; images) is refused, naming the field;
  2. it runs as a chat request does (router/http_api.py: validation, limits, admission, the
     thinking and tool-call split of router/answer_split.py);
  3. the answer becomes output items in order — `reasoning`, `message` (`output_text`),
     `function_call` — each a new item where the kind of text changes (`Items`); unary as one
     `response` object, streamed as typed events (`response.created` … `response.completed`, or
     `response.incomplete` where `max_output_tokens` cut it).
Nothing is stored (`store` is answered false).
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from protos.pdserve.v1 import generation_pb2 as pb
from router.errors import BadRequest
from router.tool_calls import Delta

FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
          "tool_choice", "parallel_tool_calls", "text", "reasoning", "store", "metadata", "user", "truncation",
          "previous_response_id", "background", "include", "service_tier", "stream_options"}  # the last three: ignored
RENAMED = {"max_tokens": "max_output_tokens", "response_format": "text.format", "reasoning_effort": "reasoning.effort",
           "messages": "input"}  # a chat field a refusal names → the Responses field it came from


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """1. A Responses request → the Chat Completions body it stands for; BadRequest naming the field."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(f"unsupported field {unknown[0]!r}", unknown[0])
    if body.get("previous_response_id") is not None:
        raise BadRequest("responses are not stored here: send the whole conversation in input",
                         "previous_response_id")
    if body.get("background"):
        raise BadRequest("background responses are not supported", "background")
    if body.get("truncation", "disabled") != "disabled":
        raise BadRequest("only truncation \"disabled\" is supported", "truncation")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
    for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                     ("stream", "stream"), ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user")):
        if body.get(src) is not None:
            chat[dst] = body[src]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if body.get("text") is not None and not isinstance(body.get("text"), dict):
        raise BadRequest("text must be an object", "text")
    if fmt is not None:
        chat["response_format"] = _format(fmt)
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise BadRequest("reasoning must be an object", "reasoning")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    return chat


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (input_text / output_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of text parts", where)
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            raise BadRequest("only text content parts (input_text, output_text) are supported", f"{where}[{j}]")
        out.append(part["text"])
    return "".join(out)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`instructions` and `input` → chat messages; a `function_call` joins the assistant turn before
    it (or opens one), a `reasoning` item's text goes with the next assistant turn."""
    msgs: list[dict[str, Any]] = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise BadRequest("instructions must be a string", "instructions")
        msgs.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return [*msgs, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("input must be a string or a non-empty list of items", "input")
    thought = ""
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and isinstance(item.get("role"), str):
            msgs.append({"role": item["role"], "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call" and all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if not (msgs and msgs[-1]["role"] == "assistant" and not thought):
                msgs.append({"role": "assistant", "content": ""})
            msgs[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output" and isinstance(item.get("call_id"), str):
            output = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": output if isinstance(output, str) else _text(output, f"{where}.output")})
        elif kind == "reasoning":
            thought += "".join(p.get("text", "") for p in (item.get("content") or item.get("summary") or [])
                               if isinstance(p, dict))
            continue
        else:
            raise BadRequest("an input item is a message (role, content), a function_call (call_id, name, "
                             "arguments), a function_call_output (call_id, output) or a reasoning item", where)
        if thought and msgs[-1]["role"] == "assistant":
            msgs[-1]["reasoning"], thought = thought, ""
    return msgs


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise BadRequest("only function tools are supported (no built-in tools)", f"tools[{i}].type")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                     if k in t}})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice  # "none" | "auto" | "required", or something the chat path refuses


def _format(fmt: Any) -> dict[str, Any]:
    if not isinstance(fmt, dict):
        raise BadRequest("text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return {k: v for k, v in fmt.items()}  # text, json_object: as chat's response_format


class Items:
    """3. An answer's output items as its parts come: `add` takes one message's split (reasoning,
    content and call deltas) and gives the stream events it makes; `items` holds them whole."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being written
        self.call_index = -1  # the open function_call's index among the answer's calls

    def add(self, reasoning: str, d: Delta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if reasoning:
            events += self._to("reasoning") + self._grow(reasoning)
        if d.content:
            events += self._to("message") + self._grow(d.content)
        for c in d.calls:
            if c["index"] != self.call_index:
                events += self._to("function_call", c)
            events += self._grow(c["function"].get("arguments", ""))
        return events

    def close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        item, self.open = self.open, None
        item["status"] = "completed"
        n = len(self.items) - 1
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            return [{"type": "response.reasoning_text.done", "item_id": item["id"], "output_index": n,
                     "content_index": 0, "text": text}, _item_event("done", n, item)]
        if item["type"] == "message":
            part = item["content"][0]
            return [{"type": "response.output_text.done", "item_id": item["id"], "output_index": n, "content_index": 0,
                     "text": part["text"], "logprobs": []},
                    {"type": "response.content_part.done", "item_id": item["id"], "output_index": n,
                     "content_index": 0, "part": part}, _item_event("done", n, item)]
        return [{"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": n,
                 "arguments": item["arguments"]}, _item_event("done", n, item)]

    def _to(self, kind: str, call: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The open item, or a new one of `kind` after closing it."""
        if self.open is not None and self.open["type"] == kind and call is None:
            return []
        events = self.close()
        rid = uuid.uuid4().hex[:24]
        if kind == "reasoning":
            item: dict[str, Any] = {"type": "reasoning", "id": f"rs_{rid}", "summary": [],
                                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
        elif kind == "message":
            item = {"type": "message", "id": f"msg_{rid}", "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        else:
            assert call is not None
            self.call_index = call["index"]
            item = {"type": "function_call", "id": f"fc_{rid}", "call_id": call["id"],
                    "name": call["function"]["name"], "arguments": "", "status": "in_progress"}
        self.items.append(item)
        self.open = item
        n = len(self.items) - 1
        events.append(_item_event("added", n, {**item, "content": []} if kind == "message" else item))
        if kind == "message":
            events.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": n,
                           "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})
        return events

    def _grow(self, text: str) -> list[dict[str, Any]]:
        item, n = self.open, len(self.items) - 1
        assert item is not None
        if not text:
            return []
        if item["type"] == "function_call":
            item["arguments"] += text
            return [{"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": n,
                     "delta": text}]
        item["content"][0]["text"] += text
        kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
        event = {"type": f"response.{kind}.delta", "item_id": item["id"], "output_index": n, "content_index": 0,
                 "delta": text}
        return [{**event, "logprobs": []} if kind == "output_text" else event]


def _item_event(what: str, n: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": f"response.output_item.{what}", "output_index": n, "item": dict(item)}


def response_obj(rid: str, model: str, body: dict[str, Any], items: list[dict[str, Any]], finish: str,
                 usage: pb.Usage | None) -> dict[str, Any]:
    """The `response` object: status from the finish ("length": incomplete, max_output_tokens), the
    request's settings echoed, usage in the Responses API's names. finish "": still in progress."""
    status = {"": "in_progress", "length": "incomplete"}.get(finish, "completed")
    out: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
        "output": items, "error": None, "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
        "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
        "store": False, "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "truncation": "disabled", "metadata": body.get("metadata") or {},
        "usage": None}
    if usage is not None:
        out["usage"] = {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                        "output_tokens": usage.completion_tokens,
                        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
                        "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    return out
