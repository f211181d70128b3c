"""POST /v1/responses on the HTTP front: a Responses request run as the chat request it stands for
(router/responses_api.py maps both ways), answered as one `response` object or as its stream of
typed events. Errors are the HTTP front's, naming the Responses field."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from router.answer_split import with_reasoning_tokens
from router.errors import BadRequest
from router.http_api import OpenAIFront, answered, error, refused
from router.openai_answers import chat_split
from router.openai_requests import Options, json_object
from router.responses_api import RENAMED, Items, chat_body, response_obj
from router.service import Refused
from router.tool_calls import Delta


def renamed(param: str | None) -> str | None:
    """A chat field a refusal names → the Responses field it came from."""
    if param is None:
        return None
    for chat, field in RENAMED.items():
        if param == chat or param.startswith((chat + "[", chat + ".")):
            return field
    if param.startswith("tools["):  # tools[i].function.parameters → tools[i].parameters
        return param.replace(".function.", ".", 1)
    return param.replace("tool_choice.function.", "tool_choice.", 1)


def _said(message: str, old: str | None, new: str | None) -> str:
    """A refusal's message naming the Responses field where it named the chat one."""
    return message.replace(old, new, 1) if old and new and old != new else message


class ResponsesFront:
    def __init__(self, front: OpenAIFront) -> None:
        self.front = front

    async def responses(self, request: Request) -> Response:
        svc = self.front.svc
        try:
            body = json_object(await request.body())
            reqs, opts = self.front.prepare(json.dumps(chat_body(body)).encode(), True)
        except BadRequest as e:
            svc.metrics.errors.labels("INVALID_ARGUMENT").inc()
            param = renamed(e.param)
            return error(e.status, _said(e.message, e.param, param), "invalid_request_error", param, e.code)
        except Refused as e:
            field = renamed(e.field)
            return refused(Refused(e.code, _said(e.message, e.field, field), field))
        rid = "resp_" + reqs[0].key
        stream = self._messages(reqs)
        if not opts.stream:
            choices = await answered(stream, 1, request)
            if not isinstance(choices, list):
                return choices
            c, items = choices[0], Items()
            reasoning, d, finish = self._split(opts, c.text, c.finish, list(c.token_ids), c.usage)
            items.add(reasoning, d)
            items.close()
            return JSONResponse(response_obj(rid, self.front.model, body, items.items, finish, c.usage))
        try:  # the first message decides between a 200 stream and an error status
            first = await anext(stream)
        except Refused as e:
            await stream.aclose()
            return refused(e)
        return StreamingResponse(self._events(rid, body, opts, first, stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _messages(self, reqs: list[Any]) -> AsyncIterator[tuple[int, Any]]:
        async def one() -> AsyncIterator[tuple[int, Any]]:
            async with aclosing(self.front.svc.stream(reqs[0])) as msgs:
                async for msg in msgs:
                    yield 0, msg
        return one()

    @staticmethod
    def _split(opts: Options, text: str, finish: str, ids: list[int], usage: Any) -> tuple[str, Delta, str]:
        """A whole answer's reasoning, content and calls, as chat splits them."""
        split = chat_split(opts)
        if split is None:
            return "", Delta(text), finish
        reasoning, d, finish = split.feed(text, finish, ids)
        if finish and usage is not None:
            with_reasoning_tokens(usage, split)
        return reasoning, d, finish

    async def _events(self, rid: str, body: dict[str, Any], opts: Options, first: tuple[int, Any],
                      stream: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[str]:
        """The typed events, each `event: TYPE` + `data: {...}` with its sequence_number; a client that
        goes away closes this generator, which cancels the request."""
        seq, model, items, split = 0, self.front.model, Items(), chat_split(opts)

        def event(e: dict[str, Any]) -> str:
            nonlocal seq
            e["sequence_number"], seq = seq, seq + 1
            return f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"

        start = response_obj(rid, model, body, [], "", None)
        yield event({"type": "response.created", "response": start})
        yield event({"type": "response.in_progress", "response": start})
        async with aclosing(stream) as msgs:  # type: ignore[type-var]
            _, msg = first
            while True:
                finish = msg.finish_reason
                if split is None:
                    reasoning, d = "", Delta(msg.text)
                else:
                    reasoning, d, finish = split.feed(msg.text, finish, msg.token_ids)
                for e in items.add(reasoning, d):
                    yield event(e)
                if msg.finish_reason:
                    if split is not None:
                        with_reasoning_tokens(msg.usage, split)
                    for e in items.close():
                        yield event(e)
                    done = response_obj(rid, model, body, items.items, finish, msg.usage)
                    kind = "completed" if done["status"] == "completed" else "incomplete"
                    yield event({"type": f"response.{kind}", "response": done})
                    return
                try:
                    _, msg = await anext(msgs)
                except Refused as e:  # mid-stream: the status is already 200; say it in the stream
                    yield event({"type": "error", "code": e.code.name.lower(), "message": e.message, "param": None})
                    return
