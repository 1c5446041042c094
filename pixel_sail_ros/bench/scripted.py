"""Force greedy decoding to a fixed answer while every forward still runs at full cost.

Why: a random-weight model never says "It is [SEG]." and never stops, so timing its answers would time
``max_new_tokens`` steps of noise. Overriding only the *logits* of each decoding step (after the LM head
ran) makes the model follow the answer a trained one gives — same forwards, same shapes, same number of
steps, same mask decoding — so segment latency and decode speed are measured as a trained model would run.
It works on the logits ``generate_answer`` reads, so it scripts every decoding mode, CUDA graphs included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

AnswerFor = Callable[[Sequence[int]], Sequence[int]]


class ScriptedAnswers:
    """A ``logits_processor`` for ``generate_answer``: a turn whose first fed token is ``turn_start_id``
    decodes ``answer_for(turn)``; when the script runs out, ``filler_id`` is chosen (a decode that never
    stops, for tokens/s measurements)."""

    def __init__(self, answer_for: AnswerFor, turn_start_id: int, filler_id: int) -> None:
        self.answer_for = answer_for
        self.turn_start_id = int(turn_start_id)
        self.filler_id = int(filler_id)
        self._script: list[int] = []
        self._pos = 0
        self.steps = 0  # decoder passes seen (for tests and sanity checks)

    def __call__(self, fed: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if fed and int(fed[0]) == self.turn_start_id:
            self._script, self._pos = [int(t) for t in self.answer_for(fed)], 0
        token = self._script[self._pos] if self._pos < len(self._script) else self.filler_id
        self._pos += 1
        self.steps += 1
        logits.fill_(-1e4)
        logits[token] = 1e4
        return logits


def fixed_answer(answer: Sequence[int]) -> AnswerFor:
    """Every turn gets the same answer."""
    ids = [int(t) for t in answer]
    return lambda _turn: ids


__all__ = ["ScriptedAnswers", "fixed_answer"]
