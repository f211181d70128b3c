"""A thinking budget (thinking_token_budget): its count (engine/think_budget.py), the sampler's
forced token, the router's markers and refusals, and a served chat answer that closes its thinking
after exactly the budget and then goes on as Hugging Face goes on from there."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from cluster.cli import main as cli_main
from engine.sampler import sample
from engine.think_budget import ThinkBudget, forced_first, forced_now
from engine.tiny import CHAT_TEMPLATE, tiny_model, tiny_tokenizer
from engine.types import SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from router.chat import chat_prompt_ids
from router.config import LimitsConfig
from router.errors import InvalidArgument
from router.openai_requests import parse_body
from router.reasoning import think_budget
from router.validation import validate
from tests.cpu.harness import RunningServer, tiny_config

OPEN, CLOSE = 259, 260  # <think>, </think>: added to the tiny tokenizer's 259


def _tokenizer(opens: bool = True):  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    tok.add_tokens(["<think>", "</think>"])  # one token each, not special: their text is in the answer (Qwen 3's)
    if opens:  # DeepSeek R1's way: the template opens the block, the answer starts inside it
        tok.chat_template = CHAT_TEMPLATE.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")
    return tok


def test_the_budget_forces_the_close_after_exactly_its_count_of_thinking() -> None:
    inside = ThinkBudget(3, CLOSE)  # the prompt opened the block
    assert [forced_now(inside, [5, 6, 7][:n]) for n in range(4)] == [None, None, None, CLOSE]
    assert forced_now(inside, [5, 6, 7, CLOSE]) is None and forced_now(inside, [5, 6, 7, CLOSE, 8, 9, 10]) is None
    opener = ThinkBudget(2, CLOSE, OPEN)  # the answer may open it (Qwen 3)
    assert forced_now(opener, []) is None and forced_now(opener, [OPEN, 5]) is None
    assert forced_now(opener, [OPEN, 5, 6]) == CLOSE  # the opener is not counted
    never = ThinkBudget(0, CLOSE, OPEN)
    assert forced_now(never, [5]) is None and forced_now(never, [5, 6, 7]) is None  # no block: nothing forced
    assert forced_now(ThinkBudget(0, CLOSE, OPEN), [OPEN]) == CLOSE
    replayed = ThinkBudget(3, CLOSE)  # a moved request's budget follows its whole output at once
    assert forced_now(replayed, [5, 6, 7]) == CLOSE and replayed.thought == 3
    zero = SamplingParams(thinking_budget=0, think_end_id=CLOSE)
    assert forced_first(zero) == CLOSE and forced_first(SamplingParams()) is None
    assert forced_first(SamplingParams(thinking_budget=0, think_end_id=CLOSE, think_open_id=OPEN)) is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_forced_row_draws_its_token_whatever_the_logits_and_the_others_are_untouched(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=g)
    logits[:, CLOSE] = -20.0  # the model's last choice
    params = [SamplingParams(temperature=temperature, logprobs=0, seed=1)] * 3
    free, _ = sample(logits.clone(), params, [4, 4, 4])
    got, lps = sample(logits.clone(), params, [4, 4, 4], forced=[None, CLOSE, None])
    assert got[1] == CLOSE and got[0] == free[0] and got[2] == free[2]
    lp = lps[1]
    assert lp is not None  # reported from the model's own distribution
    assert lp.logprob == pytest.approx(torch.log_softmax(logits[1], -1)[CLOSE].item(), abs=1e-5)


LIMITS = LimitsConfig()


def _valid(budget: int | None, tok):  # type: ignore[no-untyped-def]
    req = pb.GenerateRequest(prompt="hi")
    if budget is not None:
        req.thinking_token_budget = budget
    return validate(req, tok, LIMITS, 120)


def test_the_router_sets_the_markers_or_refuses_naming_the_field() -> None:
    tok = _tokenizer()
    opened = think_budget(_valid(7, tok), True, True, tok).sampling
    assert (opened.thinking_budget, opened.think_end_id, opened.think_open_id) == (7, CLOSE, -1)
    assert think_budget(_valid(7, tok), True, False, tok).sampling.think_open_id == OPEN
    plain = _valid(None, tok)
    assert think_budget(plain, False, False, tok) is plain
    for req, reasoning, t in [(_valid(7, tok), False, tok),  # no reasoning parser, or not a chat request
                              (_valid(7, tiny_tokenizer()), True, tiny_tokenizer())]:  # </think> is 8 tokens there
        with pytest.raises(InvalidArgument) as e:
            think_budget(req, reasoning, True, t)
        assert e.value.field == "thinking_token_budget"
    with pytest.raises(InvalidArgument, match="thinking_token_budget: must be >= 0"):
        _valid(-1, tok)
    reqs, _ = parse_body(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                     "thinking_token_budget": 12}).encode(), True, "m", 8, None, "think")
    assert reqs[0].thinking_token_budget == 12


@pytest.fixture(scope="module", params=["1p1d", "aggregated"])  # aggregated: the decode worker draws the first token
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    model = tiny_model(seed=6, vocab_size=261)  # its vocabulary holds the two markers
    folder: Path = tmp_path_factory.mktemp("thinker")
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-think-budget")
    mode = {"mode": "aggregated", "aggregated": {"num_cpus": 0.5}} if request.param == "aggregated" else {}
    srv = RunningServer(tiny_config(model={"path": str(folder)}, server={"reasoning_parser": "think"}, **mode))
    yield srv, model
    srv.stop()
    ray.shutdown()


def _greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("budget", [0, 5])  # 0: the close is the first token; 5: a decode step's
def test_a_served_answer_closes_its_thinking_at_the_budget_and_goes_on_from_there(
        served: tuple[RunningServer, torch.nn.Module], budget: int) -> None:
    server, model = served
    ask = [pb.ChatMessage(role="user", content="why is the sky blue?")]
    prompt = chat_prompt_ids(pb.GenerateRequest(messages=ask), _tokenizer())  # the router's
    assert prompt[-2:] == [OPEN, _tokenizer().encode("\n")[0]]  # it ends inside the block
    free = _greedy(model, prompt, budget + 1)
    assert CLOSE not in free  # left alone, it would not close its thinking there
    thought = free[:budget]
    want = thought + [CLOSE] + _greedy(model, prompt + thought + [CLOSE], 6)
    res = server.stub.Generate(pb.GenerateRequest(messages=ask, max_tokens=budget + 7, ignore_eos=True,
                                                  thinking_token_budget=budget), timeout=60)
    assert list(res.token_ids) == want
    assert res.usage.reasoning_tokens == budget + 1  # the thinking and its close
    assert res.parsed.reasoning == _tokenizer().decode(thought)
    unbounded = server.stub.Generate(pb.GenerateRequest(messages=ask, max_tokens=budget + 1, ignore_eos=True),
                                     timeout=60)
    assert list(unbounded.token_ids) == free


def test_the_cli_sends_a_budget(served: tuple[RunningServer, torch.nn.Module], capsys: pytest.CaptureFixture) -> None:
    server, _ = served
    assert cli_main(["generate", "why is the sky blue?", "--thinking-budget", "2", "--max-tokens", "4", "--ignore-eos",
                     "--json", "--address", server.address]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["token_ids"][2] == CLOSE and answer["usage"]["reasoning_tokens"] == 3
