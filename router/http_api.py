"""The OpenAI-compatible HTTP front (Starlette on uvicorn), beside gRPC in the router process.

  POST /v1/completions · POST /v1/chat/completions (stream: server-sent events ending `data: [DONE]`)
  POST /v1/responses (router/responses_front.py: the Responses API over the chat path)
  GET /v1/models · POST /tokenize · POST /detokenize (router/tokenize_api.py) · GET /health · GET /metrics
Each request goes through the same path as a gRPC one (router/service.py): validation, limits,
admission queue, cancellation, metrics; `n` > 1 and a batch of prompts are one such request per
choice, merged into one answer (router/choices.py). A client that disconnects, mid-stream or before
a unary answer, cancels its requests on both workers. Errors are OpenAI's shape, {"error":
{"message", "type", "param", "code"}}, with 400 / 401 / 404 / 409 / 429 / 503 / 504 (429 and 503
carry Retry-After).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from protos.pdserve.v1 import generation_pb2 as pb
from router.choices import fan_out, merged
from router.errors import BadRequest, InvalidArgument
from router.openai_answers import Choice, chat_split, chunk_obj, final_obj, total_usage, usage_obj
from router.openai_requests import Options, Prompt, parse_body, with_prompts, with_token_text
from router.http_guard import Guard, error
from router.reasoning import prompt_opens_thinking, reasoning_tokens, think_budget, think_first
from router.security import TokenStore
from router.service import GenerationService, Refused
from router.tokenize_api import detokenize, tokenize
from router.validation import ValidRequest

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
}


def refused(e: Refused) -> JSONResponse:
    status, kind = HTTP_STATUS.get(e.code, (500, "server_error"))
    return error(status, e.message, kind, e.field, e.code.name.lower(), retry_after=status in (429, 503))


class OpenAIFront:
    def __init__(self, svc: GenerationService, model: str, tool_parser: str | None = None,
                 reasoning_parser: str | None = None) -> None:
        self.svc, self.model = svc, model
        self.tool_parser, self.reasoning_parser = tool_parser, reasoning_parser

    def _token_text(self, token_id: int) -> str:
        return str(self.svc.tokenizer.decode([token_id]))

    def _reasoning_tokens(self, ids: Sequence[int]) -> int:
        return reasoning_tokens(ids, self.svc.tokenizer, self.reasoning_parser or "think")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "pdserve",
             "max_model_len": self.svc.max_model_len},
            *({"id": a, "object": "model", "created": 0, "owned_by": "pdserve", "parent": self.model,
               "max_model_len": self.svc.max_model_len} for a in self.svc.adapters)]})

    async def tokenize(self, request: Request) -> Response:
        return await self._tool(request, lambda raw: tokenize(raw, self.model, self.svc.tokenizer, self.svc.max_model_len,
                                                              self.svc.adapters))

    async def detokenize(self, request: Request) -> Response:
        return await self._tool(request, lambda raw: detokenize(raw, self.model, self.svc.tokenizer, self.svc.adapters))

    async def _tool(self, request: Request, answer: Callable[[bytes], dict[str, Any]]) -> Response:
        try:
            return JSONResponse(answer(await request.body()))
        except BadRequest as e:
            self.svc.metrics.errors.labels("INVALID_ARGUMENT").inc()
            return error(e.status, e.message, "invalid_request_error", e.param, e.code)

    async def health(self, request: Request) -> Response:
        ok = self.svc.dispatcher.serving and not self.svc.draining
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def prepare(self, raw: bytes, chat: bool) -> tuple[list[ValidRequest], Options]:
        """A body → its admitted requests (one per choice) and the answer's options; BadRequest or
        Refused naming the field."""
        pbreqs, opts = parse_body(raw, chat, self.model, self.svc.limits.max_choices, self.tool_parser,
                                  self.reasoning_parser, self.svc.adapters)
        reqs = [child for p, r in enumerate(pbreqs)  # choice p * n + i
                for child in fan_out(self._admit(r, p, len(pbreqs), opts.structured_param), opts.n)]
        opts = with_token_text(opts, self._token_text)
        parser = self.reasoning_parser or "think"
        if opts.reasoning:  # the answer starts inside a think block, or may open one
            opts = replace(opts, thinking=parser == "think" and prompt_opens_thinking(reqs[0].prompt_ids,
                                                                                        self.svc.tokenizer),
                           count_reasoning=self._reasoning_tokens)
            reqs = [think_first(r, opts.thinking, self.svc.tokenizer, parser) for r in reqs]
        try:
            reqs = [think_budget(r, opts.reasoning, opts.thinking, self.svc.tokenizer, parser) for r in reqs]
        except InvalidArgument as e:
            raise BadRequest(str(e), e.field) from None
        if opts.echo:
            opts = with_prompts(opts, [Prompt(self._prompt_text(p, r), r.prompt_ids[0])
                                       for p, r in zip(pbreqs, reqs[::opts.n]) for _ in range(opts.n)])
        return reqs, opts

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            reqs, opts = self.prepare(await request.body(), chat)
        except BadRequest as e:
            self.svc.metrics.errors.labels("INVALID_ARGUMENT").inc()
            return error(e.status, e.message, "invalid_request_error", e.param, e.code)
        except Refused as e:
            return refused(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + reqs[0].key
        stream = merged([self.svc.stream(r) for r in reqs])
        if not opts.stream:
            choices = await answered(stream, len(reqs), request)
            if not isinstance(choices, list):
                return choices
            return JSONResponse(final_obj(rid, self.model, opts, choices))
        try:  # the first message decides between a 200 stream and an error status
            first = await anext(stream)
        except Refused as e:
            await stream.aclose()
            return refused(e)
        return StreamingResponse(self._sse(rid, opts, first, stream, [len(r.prompt_ids) for r in reqs]),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _prompt_text(self, req: pb.GenerateRequest, valid: ValidRequest) -> str:
        """What echo puts before the answer: the prompt as sent, or the tokens kept of it (truncated)."""
        if req.prompt and not req.HasField("truncate_prompt_tokens"):
            return req.prompt
        return self.svc.tokenizer.decode(valid.prompt_ids)

    def _admit(self, req: pb.GenerateRequest, p: int, prompts: int, structured: str) -> ValidRequest:
        """Prompt p of a batch of `prompts`; a refusal about a batch's prompt names it: prompt[p]; one
        about the structured output names the HTTP field it came from (`structured`)."""
        try:
            return self.svc.admit(req)
        except Refused as e:
            if prompts > 1 and e.field == "prompt":
                raise Refused(e.code, f"prompt[{p}]: {e.message}", f"prompt[{p}]") from None
            if structured and e.field and e.field.startswith("structured"):
                raise Refused(e.code, e.message.replace(e.field, structured, 1), structured) from None
            raise

    async def _sse(self, rid: str, opts: Options, first: tuple[int, Any],
                   stream: AsyncIterator[tuple[int, Any]], prompt_tokens: list[int]) -> AsyncIterator[str]:
        """Events until [DONE]; a client that goes away closes this generator, which cancels every
        choice's request. prompt_tokens: choice i's prompt length."""
        started: set[int] = set()
        usages: list[pb.Usage | None] = [None] * len(prompt_tokens)
        made = [0] * len(prompt_tokens)  # choice i's tokens so far
        splits = [chat_split(opts) for _ in prompt_tokens]  # choice i's thinking and tool calls
        async with aclosing(stream) as msgs:  # type: ignore[type-var]
            (i, msg) = first
            while True:
                chunk = chunk_obj(rid, self.model, opts, i, msg, i not in started, splits[i])
                if opts.continuous_usage:  # the last message carries the choice's usage, cached tokens too
                    made[i] += len(msg.token_ids)
                    chunk["usage"] = usage_obj(msg.usage) if msg.finish_reason else {
                        "prompt_tokens": prompt_tokens[i], "completion_tokens": made[i],
                        "total_tokens": prompt_tokens[i] + made[i]}
                yield f"data: {json.dumps(chunk)}\n\n"
                started.add(i)
                if msg.finish_reason:
                    usages[i] = msg.usage
                    if all(u is not None for u in usages):
                        if opts.include_usage:
                            yield "data: " + json.dumps({
                                "id": rid, "object": "chat.completion.chunk" if opts.chat else "text_completion",
                                "created": int(time.time()), "model": self.model, "choices": [],
                                "usage": usage_obj(total_usage(usages, opts.n))}) + "\n\n"
                        break
                try:
                    i, msg = await anext(msgs)
                except Refused as e:  # mid-stream: the status is already 200; say it in the stream
                    status, kind = HTTP_STATUS.get(e.code, (500, "server_error"))
                    yield "data: " + json.dumps({"error": {"message": e.message, "type": kind, "param": None,
                                                           "code": e.code.name.lower()}}) + "\n\n"
                    break
        yield "data: [DONE]\n\n"


async def answered(stream: AsyncIterator[tuple[int, Any]], n: int, request: Request) -> list[Choice] | Response:
    """A unary answer's `n` choices gathered from `stream`; or the response to send instead: 499
    where the client left first (its requests cancelled), the refusal's status where one came."""
    choices = [Choice() for _ in range(n)]
    answer = asyncio.ensure_future(_gather(stream, choices))
    if not await _answered_before_the_client_left(answer, request):
        return Response(status_code=499)  # nobody reads it; the requests are cancelled
    try:
        answer.result()
    except Refused as e:
        return refused(e)
    return choices


async def _gather(stream: AsyncIterator[tuple[int, Any]], choices: list[Choice]) -> None:
    async with aclosing(stream) as msgs:  # type: ignore[type-var]
        async for i, msg in msgs:
            c = choices[i]
            c.text += msg.text
            c.token_ids.extend(msg.token_ids)
            c.logprobs.extend(msg.logprobs)
            c.prompt_logprobs.extend(msg.prompt_logprobs)
            c.finish, c.usage = msg.finish_reason, msg.usage


async def _answered_before_the_client_left(answer: "asyncio.Future[None]", request: Request) -> bool:
    """Waits for `answer`; a client that disconnects first cancels it (closing its streams cancels
    every choice's request on the workers), as a stream's disconnect does. The body has been read,
    so the next ASGI message is the disconnect."""
    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
        await asyncio.gather(answer, gone, return_exceptions=True)
    return not answer.cancelled()


def build_app(svc: GenerationService, model: str, tokens: TokenStore | None, max_body: int,
              tool_parser: str | None = None, reasoning_parser: str | None = None) -> ASGIApp:
    from router.responses_front import ResponsesFront  # (it builds on this module)

    front = OpenAIFront(svc, model, tool_parser, reasoning_parser)
    app = Starlette(routes=[
        Route("/v1/completions", front.completions, methods=["POST"]),
        Route("/v1/chat/completions", front.chat, methods=["POST"]),
        Route("/v1/responses", ResponsesFront(front).responses, methods=["POST"]),
        Route("/v1/models", front.models, methods=["GET"]),
        Route("/tokenize", front.tokenize, methods=["POST"]),
        Route("/detokenize", front.detokenize, methods=["POST"]),
        Route("/health", front.health, methods=["GET"]),
        Route("/metrics", front.metrics, methods=["GET"]),
    ], exception_handlers={404: _not_found, 405: _not_allowed})
    return Guard(app, tokens, max_body, svc)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, f"no route {request.url.path}", "invalid_request_error", code="not_found")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error",
                 code="method_not_allowed")
