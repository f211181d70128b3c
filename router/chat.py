"""Chat messages → prompt token ids, by the model's chat template (vLLM's request semantics).

  1. every message's role is one the API knows (ROLES); an assistant's tool calls and a tool
     message's call id go to the template as HF's chat templates read them (arguments as an object
     when they are one), and so do `tools` (each a JSON schema of its arguments: router/tools.py);
  2. the template's variables: the messages, whether the prompt ends by opening the assistant's
     turn (`add_generation_prompt`, default true) or leaves the last message open for the answer to
     continue (`continue_final_message`), and the request's `chat_template_kwargs` (e.g.
     `enable_thinking`), which may not override `apply_chat_template`'s own arguments (a
     `chat_template` among them would run the client's template);
  3. the template renders: it is the checkpoint's code, and what it raises (Llama 2's "roles must
     alternate") is the request's error, naming `messages`.
"""
from __future__ import annotations

import inspect
import json
from typing import Any

from google.protobuf import json_format

from protos.pdserve.v1 import generation_pb2 as pb
from router.errors import InvalidArgument
from router.tools import template_tools

ROLES = ("system", "user", "assistant", "tool")


def chat_prompt_ids(req: pb.GenerateRequest, tokenizer: Any) -> list[int]:
    msgs = []
    for i, m in enumerate(req.messages):  # 1.
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"{m.role!r} is not one of {', '.join(ROLES)}")
        msgs.append(_message(m))
    tools = template_tools(req)
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgument("messages", "this model has no chat template; send a raw prompt")
    cont = req.continue_final_message  # 2.
    gen = req.add_generation_prompt if req.HasField("add_generation_prompt") else not cont
    if gen and cont:
        raise InvalidArgument("continue_final_message", "needs add_generation_prompt false (the answer continues "
                                                         "the last message, not a new turn)")
    kwargs = template_kwargs(req, tokenizer)
    try:  # 3.
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, continue_final_message=cont,
                                            tokenize=True, **({"tools": tools} if tools else {}), **kwargs)
    except Exception as e:  # noqa: BLE001 - jinja's raise_exception, undefined names, type errors
        raise InvalidArgument("messages", f"the model's chat template refused them: {e}") from None
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    return list(ids)


def _message(m: pb.ChatMessage) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        msg["name"] = m.name
    if m.tool_call_id:
        msg["tool_call_id"] = m.tool_call_id
    if m.reasoning:  # Qwen 3's template reads reasoning_content, gpt-oss's thinking; vLLM's name is reasoning
        msg["reasoning_content"] = msg["reasoning"] = msg["thinking"] = m.reasoning
    if m.tool_calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                             for c in m.tool_calls]
    return msg


def _arguments(text: str) -> Any:
    """Templates (Llama 3.1's, Qwen's) render a call's arguments with `tojson`: an object, not its text."""
    try:
        args = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text
    return args if isinstance(args, dict) else text


def template_kwargs(req: pb.GenerateRequest, tokenizer: Any) -> dict[str, Any]:
    """The request's extra template variables; JSON numbers come as floats through a Struct, so a
    whole one is given back as an int (a template's `range(n)` takes no float)."""
    if not req.HasField("chat_template_kwargs"):
        return {}
    kwargs = {k: _whole(v) for k, v in json_format.MessageToDict(req.chat_template_kwargs).items()}
    own = {name for name, p in inspect.signature(tokenizer.apply_chat_template).parameters.items()
           if p.kind is not inspect.Parameter.VAR_KEYWORD} | {"messages", "conversation"}
    for k in sorted(kwargs):
        if k in own:
            raise InvalidArgument(f"chat_template_kwargs.{k}", "is an argument of the chat template's rendering, "
                                                               "not a variable a request may set")
    return kwargs


def _whole(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_whole(x) for x in v]
    if isinstance(v, dict):
        return {k: _whole(x) for k, x in v.items()}
    return v
