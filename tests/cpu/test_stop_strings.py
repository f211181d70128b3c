"""A stop string completed inside a message of several tokens (the worker's accepted speculative run,
or events merged while the router was busy): the answer ends at the token that completed it — its
token ids, logprobs and usage as well as its text. A router over a scripted worker that sends 4 tokens
a message (tests/cpu/scripted.py)."""
from __future__ import annotations

import openai
import pytest

from engine.tiny import tiny_tokenizer
from protos.pdserve.v1 import generation_pb2 as pb
from tests.cpu.scripted import ScriptedRouter

TOK = tiny_tokenizer()
TEXT = "the cat sat on the mat"
IDS = TOK.encode(TEXT, add_special_tokens=False)  # one token a character: "cat" ends with token 7 of 22


@pytest.fixture(scope="module")
def router():  # type: ignore[no-untyped-def]
    with ScriptedRouter(IDS, TOK) as r:
        yield r


def upto(stop: str) -> list[int]:
    """The ids through the one whose text completes `stop`."""
    return next(IDS[:k] for k in range(1, len(IDS) + 1) if stop in TOK.decode(IDS[:k]))


@pytest.mark.parametrize("include", [False, True])
def test_the_answer_ends_at_the_token_that_completed_the_stop_string(router: ScriptedRouter, include: bool) -> None:
    want = upto("cat")
    assert len(want) == 7 and len(want) % 4 not in (0, 1)  # inside the scripted worker's second message of 4
    req = pb.GenerateRequest(prompt="hi", max_tokens=40, stop=["cat"], include_stop_str_in_output=include)
    unary = router.stub.Generate(req, timeout=30)
    assert unary.text == ("the cat" if include else "the ") and unary.stop_reason == "cat"
    assert list(unary.token_ids) == want and unary.usage.completion_tokens == len(want)
    msgs = list(router.stub.GenerateStream(req, timeout=30))
    assert "".join(m.text for m in msgs) == unary.text
    assert [t for m in msgs for t in m.token_ids] == want and msgs[-1].usage.completion_tokens == len(want)


def test_openai_usage_and_logprobs_end_there_too(router: ScriptedRouter) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key="x", max_retries=0)
    want = upto("sat")
    got = client.completions.create(model="tiny", prompt="hi", max_tokens=40, stop=["sat"], logprobs=0)
    assert got.choices[0].text == "the cat " and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(want)
    lps = got.choices[0].logprobs
    assert lps is not None  # the scripted worker's: token i's is -(i + 1) / 10
    assert lps.token_logprobs == pytest.approx([-(i + 1) / 10 for i in range(len(want))])
