"""Force greedy decoding to a fixed answer while every forward still runs at full cost.

Why: a random-weight model never says "It is [SEG]." and never stops, so timing its answers would time
``max_new_tokens`` steps of noise. Overriding only the *logits* of each decoding step (after the LM head
ran) makes the model follow the answer a trained one gives — same forwards, same shapes, same number of
steps, same mask decoding — so segment latency and decode speed are measured as a trained model would run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional


AnswerFor = Callable[[Sequence[int]], Sequence[int]]


class ScriptedAnswers:
    """Context manager: while active, each turn that starts with ``turn_start_id`` decodes ``answer_for(turn)``.

    The prefix pass (a chunk holding ``<vpatch>`` tokens) is left alone. When the script runs out, the
    ``filler_id`` token is chosen (a decode that never stops, for tokens/s measurements).
    """

    def __init__(self, model: Any, answer_for: AnswerFor, turn_start_id: int, filler_id: int) -> None:
        self.model = model
        self.answer_for = answer_for
        self.turn_start_id = int(turn_start_id)
        self.filler_id = int(filler_id)
        self.patch_id = int(model.config.vision_patch_token_id)
        self._script: list[int] = []
        self._pos = 0
        self._handle: Optional[Any] = None
        self.steps = 0  # decode forwards seen (for tests and sanity checks)

    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or output.logits is None or bool((ids == self.patch_id).any()):
            return output
        chunk = ids[0].tolist()
        if chunk and chunk[0] == self.turn_start_id:
            self._script, self._pos = [int(t) for t in self.answer_for(chunk)], 0
        token = self._script[self._pos] if self._pos < len(self._script) else self.filler_id
        self._pos += 1
        self.steps += 1
        last = output.logits[:, -1]
        last.fill_(-1e4)
        last[:, token] = 1e4
        return output

    def __enter__(self) -> ScriptedAnswers:
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def fixed_answer(answer: Sequence[int]) -> AnswerFor:
    """Every turn gets the same answer."""
    ids = [int(t) for t in answer]
    return lambda _turn: ids


__all__ = ["ScriptedAnswers", "fixed_answer"]
