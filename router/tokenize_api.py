"""vLLM's /tokenize and /detokenize: the served model's tokenizer and chat template, without generating.

/tokenize takes `prompt` (with `add_special_tokens`, default true, as generation tokenizes it) or
chat `messages` (with the chat template's options, as /v1/chat/completions renders them) and
answers `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` with `return_token_strs`).
/detokenize takes `tokens` and answers `{"prompt"}`. Unknown fields are refused naming them, as on
the other routes.
"""
from __future__ import annotations

from typing import Any

from protos.pdserve.v1 import generation_pb2 as pb
from router.chat import chat_prompt_ids
from router.errors import BadRequest, InvalidArgument
from router.openai_requests import chat_messages, json_object, token_id_list

TOKENIZE_PROMPT = {"model", "prompt", "add_special_tokens", "return_token_strs"}
TOKENIZE_CHAT = {"model", "messages", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                 "tools", "return_token_strs"}
DETOKENIZE = {"model", "tokens"}


def tokenize(raw: bytes, model: str, tokenizer: Any, max_model_len: int, adapters: tuple[str, ...] = ()) -> dict[str, Any]:
    body = _body(raw, model, adapters)
    _known(body, TOKENIZE_CHAT if "messages" in body else TOKENIZE_PROMPT)
    strs = _flag(body, "return_token_strs", False)
    if "messages" in body:
        req = pb.GenerateRequest()
        chat_messages(body, req)
        try:
            ids = chat_prompt_ids(req, tokenizer)
        except InvalidArgument as e:
            raise BadRequest(str(e), e.field) from None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (or send messages)", "prompt")
        ids = list(tokenizer(prompt, add_special_tokens=_flag(body, "add_special_tokens", True))["input_ids"])
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids) if strs else None}


def detokenize(raw: bytes, model: str, tokenizer: Any, adapters: tuple[str, ...] = ()) -> dict[str, Any]:
    body = _body(raw, model, adapters)
    _known(body, DETOKENIZE)
    if "tokens" not in body:
        raise BadRequest("tokens must be a list of token ids", "tokens")
    ids = token_id_list(body, "tokens")
    vocab = len(tokenizer)
    for i, t in enumerate(ids):
        if t >= vocab:
            raise BadRequest(f"{t} is outside the vocabulary (size {vocab})", f"tokens[{i}]")
    return {"prompt": tokenizer.decode(ids)}


def _body(raw: bytes, model: str, adapters: tuple[str, ...]) -> dict[str, Any]:
    """The body; its `model` (optional here, as in vLLM) the served one or one of its LoRA adapters
    (same tokenizer)."""
    body = json_object(raw)
    if body.get("model", model) not in (model, *adapters):
        raise BadRequest(f"model {body.get('model')!r} is not served here (this server serves {model!r})",
                         "model", 404, "model_not_found")
    return body


def _known(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unsupported field: {unknown[0]}", unknown[0], code="unsupported_parameter")


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be a boolean", name, code="invalid_type")
    return v
