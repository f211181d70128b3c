"""OpenAI request bodies → pb.GenerateRequest (the answers' shapes: router/openai_answers.py).

The fields a user relies on are mapped one to one; any field this module does not know is refused
(400, `param` names it), never silently ignored. `n` and a /v1/completions batch of prompts become
one request per choice (router/choices.py), up to `limits.max_choices`. vLLM's extras (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, `bad_words`) are accepted as vLLM accepts them.
/v1/completions' `echo` puts the prompt before the answer, and with `logprobs` its tokens' logprobs
before the answer's (the first prompt token's is null): what lm-eval's loglikelihood tasks read.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from protos.pdserve.v1 import generation_pb2 as pb
from router.errors import BadRequest
from router.reasoning import keep_markers
from router.structured import HTTP_FIELDS, from_http
from router.tools import ToolMode, message_tool_fields, tool_mode, tools_from_http

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty", "ignore_eos",
          "min_tokens", "user", "cache_salt", "logit_bias", "stop_token_ids", "include_stop_str_in_output",
          "skip_special_tokens", "truncate_prompt_tokens", "prompt_logprobs",
          "allowed_token_ids", "priority", "bad_words", "thinking_token_budget", *HTTP_FIELDS}
COMPLETION = COMMON | {"prompt", "logprobs", "echo"}
CHAT = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "add_generation_prompt",
                 "continue_final_message", "chat_template_kwargs", "tools", "tool_choice", "parallel_tool_calls",
                 "include_reasoning", "reasoning_effort"}
EFFORTS = ("none", "minimal", "low", "medium", "high")  # OpenAI's reasoning_effort


@dataclass(frozen=True)
class Options:
    """What shapes the answer, beside the generation itself."""

    chat: bool
    stream: bool
    include_usage: bool
    logprobs: bool
    n: int = 1  # choices per prompt
    token_text: Callable[[int], str] = str  # a token id's text, for logprobs (set by the front)
    echo: bool = False  # completions: the prompt goes before each choice's text (and logprobs)
    prompts: tuple[Prompt, ...] = ()  # echo: choice i's prompt (set by the front, once tokenized)
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage so far in every chunk
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs: the choice (chat: the answer) carries them
    structured_param: str = ""  # the HTTP field the structured output came from (a refusal of it names it)
    tools: ToolMode | None = None  # chat: how the answer becomes tool_calls (router/tool_calls.py); None: text
    reasoning: bool = False  # chat: split the thinking out (server.reasoning_parser)
    harmony: bool = False  # ... as gpt-oss's channels (server.reasoning_parser: harmony; router/harmony.py)
    include_reasoning: bool = True  # vLLM's include_reasoning: false leaves the thinking out of the answer
    thinking: bool = False  # the prompt opened a think block: the answer starts inside it (set by the front)
    count_reasoning: Callable[[Sequence[int]], int] | None = None  # an answer's ids → its thinking's (the front's)


@dataclass(frozen=True)
class Prompt:
    """What `echo` puts before a choice: the prompt's text and its first token (which has no logprob)."""

    text: str
    first_id: int


def parse_body(raw: bytes, chat: bool, model: str, max_choices: int, tool_parser: str | None = None,
               reasoning_parser: str | None = None, adapters: tuple[str, ...] = ()) -> tuple[list[pb.GenerateRequest], Options]:
    """One request per prompt (chat: one), the same fields each; choice `p * n + i` is prompt p's i-th.
    tool_parser, reasoning_parser: the server's (server.tool_call_parser, server.reasoning_parser);
    adapters: its LoRA adapters, which `model` may name instead of the model."""
    body = json_object(raw)
    unknown = sorted(set(body) - (CHAT if chat else COMPLETION))
    if unknown:
        raise BadRequest(f"unsupported field: {unknown[0]}", unknown[0], code="unsupported_parameter")
    if body.get("model") != model and body.get("model") not in adapters:
        served = ", ".join([model, *adapters])
        raise BadRequest(f"model {body.get('model')!r} is not served here (this server serves {served})",
                         "model", 404, "model_not_found")
    n = _get(body, "n", int, 1)
    if n < 1:
        raise BadRequest("n must be >= 1", "n")
    req = pb.GenerateRequest()
    if chat:
        chat_messages(body, req)
        prompts: list[str | list[int]] = []
    else:
        prompts = _prompts(body)
    if max(1, len(prompts)) * n > max_choices:
        raise BadRequest(f"{max(1, len(prompts))} prompt(s) × n={n} exceeds limits.max_choices={max_choices}",
                         "n" if n > 1 else "prompt")
    max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      int, None)
    if max_tokens is not None:
        _set(req, "max_tokens", max_tokens, "max_completion_tokens" if chat and "max_completion_tokens" in body
             else "max_tokens")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        v = _get(body, name, float, None)
        if v is not None:
            setattr(req, name, v)
    for name in ("top_k", "seed"):
        v = _get(body, name, int, None)
        if v is not None:
            if name == "seed" and v < 0:
                raise BadRequest("seed must be >= 0", "seed")
            if name == "top_k" and v < 0:  # vLLM: -1 = off
                v = 0 if v == -1 else v
            _set(req, name, v)
    req.ignore_eos = _get(body, "ignore_eos", bool, False)
    min_tokens = _get(body, "min_tokens", int, None)
    if min_tokens is not None:
        _set(req, "min_tokens", min_tokens)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop must be a string or a list of strings", "stop")
        req.stop.extend(stops)
    bad_words = body.get("bad_words")
    if bad_words is not None:
        if not isinstance(bad_words, list) or not all(isinstance(w, str) for w in bad_words):
            raise BadRequest("bad_words must be a list of strings", "bad_words")
        req.bad_words.extend(bad_words)
    req.stop_token_ids.extend(token_id_list(body, "stop_token_ids"))
    req.allowed_token_ids.extend(token_id_list(body, "allowed_token_ids"))
    structured = from_http(body, req)
    req.include_stop_str_in_output = _get(body, "include_stop_str_in_output", bool, False)
    _set(req, "priority", _get(body, "priority", int, 0))
    budget = _get(body, "thinking_token_budget", int, None)
    if budget is not None:
        _set(req, "thinking_token_budget", budget)
    truncate = _get(body, "truncate_prompt_tokens", int, None)
    if truncate is not None:
        _set(req, "truncate_prompt_tokens", truncate)
    skip = _get(body, "skip_special_tokens", bool, None)
    if skip is not None:
        req.skip_special_tokens = skip
    if chat:
        keep_markers(req, reasoning_parser)
    tools = tool_mode(body, req, structured, tool_parser) if chat else None
    include_reasoning = _get(body, "include_reasoning", bool, True)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise BadRequest("logit_bias must map token ids to numbers", "logit_bias")
        for k, v in bias.items():
            if (not (k.isascii() and k.isdigit() and int(k) < 2**32) or isinstance(v, bool)
                    or not isinstance(v, (int, float)) or not -100 <= v <= 100):
                raise BadRequest(f"logit_bias[{k!r}]: keys are token ids, values numbers in [-100, 100]", "logit_bias")
            req.logit_bias[int(k)] = float(v)
    logprobs = _logprobs(body, chat)
    if logprobs is not None:
        _set(req, "logprobs", logprobs, "top_logprobs" if chat else "logprobs")
    echo = not chat and _get(body, "echo", bool, False)
    if echo and logprobs is not None:
        req.prompt_logprobs = req.logprobs
    stream = _get(body, "stream", bool, False)
    scored = _get(body, "prompt_logprobs", int, None)  # vLLM's: per prompt position, a dict of token → logprob, rank
    if scored is not None:
        if stream:
            raise BadRequest("prompt_logprobs is not available with stream (as in vLLM)", "prompt_logprobs")
        if req.HasField("prompt_logprobs") and req.prompt_logprobs != scored:
            raise BadRequest(f"prompt_logprobs={scored} differs from echo's logprobs={req.prompt_logprobs}",
                             "prompt_logprobs")
        _set(req, "prompt_logprobs", scored)
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}):
        raise BadRequest("stream_options takes include_usage and continuous_usage_stats", "stream_options")
    include_usage = bool(opts and _get(opts, "include_usage", bool, False))
    continuous = bool(opts and _get(opts, "continuous_usage_stats", bool, False))
    _get(body, "user", str, None)
    req.cache_salt = _get(body, "cache_salt", str, "")  # vLLM's name: prefix KV shared only within a salt
    if body["model"] != model:  # one of its LoRA adapters
        req.lora_adapter = body["model"]
    reqs = [req] if chat else [_with_prompt(req, p) for p in prompts]
    return reqs, Options(chat, stream, include_usage, logprobs is not None, n, echo=echo, continuous_usage=continuous,
                         prompt_logprobs=scored is not None,
                         structured_param=structured or (tools.param if tools else ""), tools=tools,
                         reasoning=chat and reasoning_parser is not None,
                         harmony=chat and reasoning_parser == "harmony", include_reasoning=include_reasoning)


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # json's decoder recurses per level of nesting
        raise BadRequest("the body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    return body


def token_id_list(body: dict[str, Any], name: str) -> list[int]:
    """A field that is a list of token ids (each fits the wire's uint32); absent: []."""
    ids = body.get(name)
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
                                            for t in ids):
        raise BadRequest(f"{name} must be a list of token ids", name)
    return ids


def _prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """A string, a list of token ids, or a batch: a list of either."""
    p = body.get("prompt")
    if isinstance(p, str) or _token_ids(p):
        return [p]  # type: ignore[list-item]
    if isinstance(p, list) and p and all(isinstance(q, str) or _token_ids(q) for q in p):
        return p
    raise BadRequest("prompt must be a string, a list of token ids, or a list of these", "prompt")


def _token_ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p)


def _with_prompt(base: pb.GenerateRequest, p: str | list[int]) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    req.CopyFrom(base)
    if isinstance(p, str):
        req.prompt = p
    else:
        req.prompt_token_ids.extend(p)
    return req


def chat_messages(body: dict[str, Any], req: pb.GenerateRequest) -> None:
    """`messages`, `tools` and the chat template's options into `req` (/v1/chat/completions, /tokenize)."""
    _messages(body, req)
    tools_from_http(body, req)
    _template_options(body, req)


def _messages(body: dict[str, Any], req: pb.GenerateRequest) -> None:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a role and a content", f"messages[{i}]")
        content = m.get("content")
        if content is None and m.get("tool_calls"):  # an assistant's turn that only called tools
            content = ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest("only text content parts are supported", f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest("content must be a string or a list of text parts", f"messages[{i}].content")
        message_tool_fields(m, i, req.messages.add(role=m["role"], content=content))


def _template_options(body: dict[str, Any], req: pb.GenerateRequest) -> None:
    """vLLM's chat template options; router/chat.py checks how they combine."""
    gen = _get(body, "add_generation_prompt", bool, None)
    if gen is not None:
        req.add_generation_prompt = gen
    req.continue_final_message = _get(body, "continue_final_message", bool, False)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
        req.chat_template_kwargs.update(kwargs)
    effort = body.get("reasoning_effort")
    if effort is not None:  # as vLLM: a variable of the chat template (gpt-oss's reads it; others ignore it)
        if effort not in EFFORTS:
            raise BadRequest(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {effort!r}",
                             "reasoning_effort")
        if "reasoning_effort" not in req.chat_template_kwargs:  # chat_template_kwargs' own wins
            req.chat_template_kwargs.update({"reasoning_effort": effort})


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if chat:
        if not _get(body, "logprobs", bool, False):
            if body.get("top_logprobs") is not None:
                raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
            return None
        return _get(body, "top_logprobs", int, 0)
    return _get(body, "logprobs", int, None)


def _set(req: pb.GenerateRequest, field: str, value: int, param: str | None = None) -> None:
    """An integer into its wire field; one past the field's range (int32, uint64) is a 400, not a crash."""
    try:
        setattr(req, field, value)
    except ValueError:
        raise BadRequest(f"{param or field} is out of range: {value}", param or field) from None


def _get(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, kind) and not (kind is not bool and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        raise BadRequest(f"{name} must be {'a number' if kind is float else 'an integer' if kind is int else kind.__name__}",
                         name, code="invalid_type")
    return v


def with_token_text(opts: Options, text: Callable[[int], str]) -> Options:
    return replace(opts, token_text=text)


def with_prompts(opts: Options, prompts: list[Prompt]) -> Options:
    """echo: choice i's prompt, once the front has tokenized it."""
    return replace(opts, prompts=tuple(prompts))
