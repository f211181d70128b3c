"""A thinking budget (vLLM's `thinking_token_budget`): at most N tokens of a reasoning model's
thinking, then `</think>` is the only token it may draw, and the answer follows.

A request carries it in its SamplingParams (the router sets the marker ids: router/reasoning.py):
  - `thinking_budget`: N; None: no budget;
  - `think_end_id`: the one token of "</think>";
  - `think_open_id`: -1 where the answer starts inside its thinking (the prompt opened the block:
    DeepSeek R1, Qwen 3 Thinking-2507); else the one token of "<think>", which as the answer's first
    token opens it (Qwen 3), and any other first token means no thinking (nothing is forced).
A ThinkBudget is a function of the output tokens it followed, as a Guide is (engine/structured.py):
the prefill worker's (the first token) and the decode worker's agree, and a preempted or moved
request's replays its output. The sampler forces its token last, over every other rule.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence

from engine.types import SamplingParams


class Phase(enum.Enum):
    OPENING = "opening"  # no token yet, and the answer may open its thinking
    THINKING = "thinking"
    ANSWER = "answer"  # closed, or never opened: nothing more is forced


class ThinkBudget:
    """One request's count: its phase, the thinking tokens so far, the output tokens followed."""

    def __init__(self, budget: int, end_id: int, open_id: int = -1) -> None:
        self.budget, self.end_id, self.open_id = budget, end_id, open_id
        self.phase = Phase.THINKING if open_id < 0 else Phase.OPENING
        self.thought = 0  # thinking tokens so far (the opener not counted)
        self.followed = 0  # output tokens taken

    @staticmethod
    def of(sampling: SamplingParams) -> ThinkBudget | None:
        if sampling.thinking_budget is None:
            return None
        return ThinkBudget(sampling.thinking_budget, sampling.think_end_id, sampling.think_open_id)

    def follow(self, output_ids: Sequence[int]) -> None:
        """Take the output tokens not yet taken."""
        for tok in output_ids[self.followed:]:
            if self.phase is Phase.OPENING:
                self.phase = Phase.THINKING if tok == self.open_id else Phase.ANSWER
            elif self.phase is Phase.THINKING:
                if tok == self.end_id:
                    self.phase = Phase.ANSWER
                else:
                    self.thought += 1
        self.followed = max(self.followed, len(output_ids))

    @property
    def forced(self) -> int | None:
        """The next token, where the budget is spent; None: free."""
        return self.end_id if self.phase is Phase.THINKING and self.thought >= self.budget else None


def forced_now(budget: ThinkBudget | None, output_ids: Sequence[int]) -> int | None:
    """The token a request must draw next (its budget having followed `output_ids`), or None."""
    if budget is None:
        return None
    budget.follow(output_ids)
    return budget.forced


def forced_first(sampling: SamplingParams) -> int | None:
    """The token an answer must start with: "</think>" under a budget of 0 in a block the prompt opened."""
    return forced_now(ThinkBudget.of(sampling), ())
