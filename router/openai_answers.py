"""pdserve answers → OpenAI response objects: a stream's chunks, the unary answer, usage and the
logprob shapes (chat's, the legacy completions', vLLM's prompt_logprobs). The requests side is
router/openai_requests.py."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protos.pdserve.v1 import generation_pb2 as pb
from router.openai_requests import Options, Prompt
from router.answer_split import ChatSplit, with_reasoning_tokens
from router.tool_calls import merged


def _finish(reason: str) -> str | None:
    return {"length": "length", "stop": "stop", "": None}.get(reason, reason)


def chat_split(opts: Options) -> ChatSplit | None:
    return (ChatSplit(opts.tools, opts.reasoning, opts.thinking, opts.include_reasoning, opts.count_reasoning,
                      opts.harmony)
            if opts.chat and (opts.tools or opts.reasoning) else None)


def chunk_obj(rid: str, model: str, opts: Options, index: int, msg: pb.GenerateStreamResponse,
              first: bool, split: ChatSplit | None = None) -> dict[str, Any]:
    """One SSE event of a stream: a message of choice `index` (`first`: that choice's first);
    `split`: that choice's ChatSplit (chat with tools or a reasoning parser)."""
    if opts.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        finish = msg.finish_reason
        if split is None:
            delta["content"] = msg.text
        else:
            reasoning, d, finish = split.feed(msg.text, finish, msg.token_ids)
            if finish:
                with_reasoning_tokens(msg.usage, split)
            if reasoning:
                delta["reasoning"] = delta["reasoning_content"] = reasoning
            if d.content or first or not (d.calls or reasoning):
                delta["content"] = d.content or (None if d.calls or reasoning else "")
            if d.calls:
                delta["tool_calls"] = d.calls
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": _finish(finish)}
        if opts.logprobs:
            choice["logprobs"] = {"content": [_chat_lp(lp, opts.token_text) for lp in msg.logprobs]}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [choice]}
    echo = opts.prompts[index] if opts.echo and first else None
    choice = {"index": index, "text": (echo.text if echo else "") + msg.text, "finish_reason": _finish(msg.finish_reason),
              "logprobs": _completion_lp(msg.logprobs, opts.token_text, echo, msg.prompt_logprobs)
              if opts.logprobs else None}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}


@dataclass
class Choice:
    """One choice's answer, gathered from its messages."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish: str = ""
    logprobs: list[Any] = field(default_factory=list)
    usage: pb.Usage | None = None  # from its last message
    prompt_logprobs: list[Any] = field(default_factory=list)  # from its first message, when asked for


def final_obj(rid: str, model: str, opts: Options, choices: list[Choice]) -> dict[str, Any]:
    if opts.chat:
        out = []
        for i, c in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish = c.finish
            split = chat_split(opts)
            if split is not None:
                reasoning, d, finish = split.feed(c.text, c.finish, c.token_ids)
                if c.usage is not None:
                    with_reasoning_tokens(c.usage, split)
                calls = merged(d.calls)
                message["content"] = (d.content or None) if calls else d.content
                if opts.reasoning:
                    message["reasoning"] = message["reasoning_content"] = reasoning or None
                if calls:
                    message["tool_calls"] = calls
            choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": _finish(finish)}
            if opts.logprobs:
                choice["logprobs"] = {"content": [_chat_lp(lp, opts.token_text) for lp in c.logprobs]}
            out.append(choice)
        answer = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                  "choices": out, "usage": usage_obj(total_usage([c.usage for c in choices], opts.n))}
        if opts.prompt_logprobs:  # one prompt: its first choice's
            answer["prompt_logprobs"] = _vllm_prompt_lp(choices[0].prompt_logprobs, opts.token_text)
        return answer
    out = [{"index": i, "text": (opts.prompts[i].text if opts.echo else "") + c.text,
            "finish_reason": _finish(c.finish),
            "logprobs": _completion_lp(c.logprobs, opts.token_text, opts.prompts[i] if opts.echo else None,
                                       c.prompt_logprobs) if opts.logprobs else None}
           for i, c in enumerate(choices)]
    if opts.prompt_logprobs:
        for choice, c in zip(out, choices):
            choice["prompt_logprobs"] = _vllm_prompt_lp(c.prompt_logprobs, opts.token_text)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": usage_obj(total_usage([c.usage for c in choices], opts.n))}


def total_usage(usages: list[pb.Usage | None], n: int) -> pb.Usage:
    """Of every choice: the prompt's tokens (and its cached ones) once per prompt — its first choice's
    — and every choice's completion tokens."""
    total = pb.Usage()
    for i, u in enumerate(usages):
        if u is None:
            continue
        if i % n == 0:
            total.prompt_tokens += u.prompt_tokens
            total.cached_tokens += u.cached_tokens
        total.completion_tokens += u.completion_tokens
        if u.HasField("reasoning_tokens"):
            total.reasoning_tokens += u.reasoning_tokens
    return total


def usage_obj(u: pb.Usage) -> dict[str, Any]:
    obj = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}
    if u.HasField("reasoning_tokens"):
        obj["completion_tokens_details"] = {"reasoning_tokens": u.reasoning_tokens}
    return obj


def _chat_lp(lp: Any, text: Callable[[int], str]) -> dict[str, Any]:
    return {"token": text(lp.token_id), "logprob": lp.logprob, "bytes": list(text(lp.token_id).encode()),
            "top_logprobs": [{"token": text(t.token_id), "logprob": t.logprob, "bytes": list(text(t.token_id).encode())}
                             for t in lp.top_logprobs]}


def _completion_lp(lps: list[Any], text: Callable[[int], str], echo: Prompt | None = None,
                   prompt_lps: list[Any] | None = None) -> dict[str, Any]:
    """The legacy shape, one entry per token; echo: the prompt's tokens first, its first one null."""
    if echo is None:
        first, head, scored = [], [], lps
    else:
        first, head, scored = [text(echo.first_id)], [None], [*(prompt_lps or ()), *lps]
    return {"tokens": first + [text(lp.token_id) for lp in scored],
            "token_logprobs": head + [lp.logprob for lp in scored],
            "top_logprobs": head + [{text(t.token_id): t.logprob for t in lp.top_logprobs} for lp in scored]}


def _vllm_prompt_lp(lps: list[Any], text: Callable[[int], str]) -> list[dict[str, Any] | None]:
    """vLLM's shape: None for the first prompt token, then per position the token's {logprob, rank,
    decoded_token} and the top-N's (ranks 1..N), keyed by token id."""
    out: list[dict[str, Any] | None] = [None]
    for lp in lps:
        d = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank if lp.HasField("rank") else None,
                                "decoded_token": text(lp.token_id)}}
        for r, t in enumerate(lp.top_logprobs, 1):
            d.setdefault(str(t.token_id), {"logprob": t.logprob, "rank": r, "decoded_token": text(t.token_id)})
        out.append(d)
    return out
