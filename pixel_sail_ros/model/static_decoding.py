"""Greedy decoding over a fixed-size KV cache that lives across frames, with the one-token step as a CUDA graph.

Why: on a GPU, eager decoding is bound by kernel launches, not arithmetic. A profile of one request on an H200
(README "Performance", CUDA) showed ~1560 launches and 39 ms of CPU time for 3.4 ms of GPU work; each decoded
token of the 0.5b preset cost ~16-19 ms. A CUDA graph launches a whole decode step at once, but it replays fixed
addresses: so the KV cache, the step's inputs and its outputs are allocated once here and reused for every frame.
Each prefill refills the cache from position 0 and each answer rewinds it to the end of the prefix; entries past
the current position are stale but masked out, so nothing is copied between turns.

Without CUDA (or with ``use_graphs=False``) the same static-cache steps run eagerly, which is how the CPU tests
check this path against :class:`~transformers.DynamicCache` decoding. With ``compile_steps`` the one-token step goes
through ``torch.compile`` instead (on any device): its shapes never change, so it compiles once (twice with visual
prompts) and then skips most of the per-operator Python and dispatch work that dominates a small model's decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import StaticCache

if TYPE_CHECKING:
    from .modeling_pixel_sail import PixelSailForConditionalGeneration


class StaticDecoding:
    """A reusable fixed-size cache plus the decode-step machinery for one model (batch 1).

    Args:
        model: the model whose decoder fills the cache.
        reserve: cache slots kept beyond each prefix for the question and the answer; a turn that needs more
            is decoded with a dynamic cache instead (see ``PixelSailForConditionalGeneration.generate_answer``).
        use_graphs: capture the one-token step as a CUDA graph (None: when the model is on CUDA and
            ``compile_steps`` is off).
        granularity: the cache length is rounded up to a multiple of this, so nearby image sizes share one cache
            (and one graph).
        compile_steps: run the one-token step through ``torch.compile`` (not with ``use_graphs``). The first
            answers pay the compilation (tens of seconds on a small CPU); multi-token chunks (the question) stay eager.
    """

    def __init__(
        self,
        model: PixelSailForConditionalGeneration,
        reserve: int = 512,
        use_graphs: bool | None = None,
        granularity: int = 256,
        compile_steps: bool = False,
    ):
        self.model = model
        self.reserve = int(reserve)
        self.granularity = int(granularity)
        self.device = model.lm_head.weight.device
        on_cuda = self.device.type == "cuda"
        self.use_graphs = (on_cuda and not compile_steps) if use_graphs is None else bool(use_graphs)
        if self.use_graphs and not on_cuda:
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if compile_steps and self.use_graphs:
            raise ValueError("compile_steps and use_graphs are two ways to speed up the same step: pick one")
        self.cache: StaticCache | None = None
        self.max_len = 0
        self.graph_replays = 0  # how many steps were replayed from the graph (tests and benchmarks read it)
        self.generation = 0  # counts prefills: a prefix remembers its own and is refused once overwritten
        self._graph: torch.cuda.CUDAGraph | None = None
        # Models that pool visual prompts add them at <Prompt k> tokens; their graph always takes a prompt buffer
        # (zeros when a request has no prompts: adding zeros changes nothing), so one graph serves every request.
        self._with_prompts = bool(model.config.pools_visual_prompts)
        self._buffers: dict[str, torch.Tensor] = {}
        # dynamic=False: every one-token step has the same shapes, so there is nothing to generalise over
        self._compiled_step = torch.compile(model.text_step, dynamic=False) if compile_steps else None
        self.compiled_steps = 0  # how many steps ran compiled (tests and benchmarks read it)

    # ---- the cache -------------------------------------------------------------------------------------

    def cache_for_prefill(self, prefix_length: int) -> StaticCache:
        """The cache, rewound to 0 and big enough for ``prefix_length`` + the reserve (reallocated if not)."""
        needed = prefix_length + self.reserve
        if self.cache is None or needed > self.max_len:
            self.max_len = -(-needed // self.granularity) * self.granularity
            self.cache = StaticCache(config=self.model.config.text_config, max_cache_len=self.max_len)
            self._graph, self._buffers = None, {}
        self.rewind(0)
        return self.cache

    def begin_prefix(self) -> int:
        """Mark a new prefix in the cache; returns its generation number."""
        self.generation += 1
        return self.generation

    def rewind(self, length: int) -> None:
        """Next write at position ``length``: later entries become stale (every mask hides them)."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(length)

    def mask(self, query_length: int, past: int) -> torch.Tensor:
        """(1, 1, q, max_len) bool: new tokens see the ``past`` cached ones and, causally, each other."""
        columns = torch.arange(self.max_len, device=self.device)
        rows = torch.arange(query_length, device=self.device) + past
        return (columns[None, :] <= rows[:, None]).view(1, 1, query_length, self.max_len)

    # ---- one step --------------------------------------------------------------------------------------

    def run(
        self, token_ids: list[int], past: int, position: int, visual_prompt_features: torch.Tensor | None,
        logits_to_keep: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``token_ids`` at cache position ``past`` / position id ``position``; (hidden (q, C), logits of the
        last ``logits_to_keep`` tokens (logits_to_keep, V)).

        A single token on CUDA replays the captured graph: its outputs are overwritten by the next step, so a
        caller that keeps them must clone them.
        """
        if len(token_ids) == 1 and self.use_graphs:
            return self._replay(token_ids[0], past, position, visual_prompt_features)
        step = None
        if len(token_ids) == 1 and self._compiled_step is not None:
            step = self._compiled_step
            self.compiled_steps += 1
        mask = self.mask(len(token_ids), past)
        return self.model.decode_tokens(token_ids, position, mask, self.cache, visual_prompt_features, step=step,
                                        logits_to_keep=logits_to_keep)

    def _replay(
        self, token_id: int, past: int, position: int, visual_prompt_features: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._buffers:
            self._buffers = self._allocate_buffers()
        b = self._buffers
        b["ids"].fill_(token_id)
        b["positions"].fill_(position)
        torch.le(b["columns"], past, out=b["mask"])
        if self._with_prompts:
            if visual_prompt_features is None:
                b["prompts"].zero_()
            else:
                b["prompts"].copy_(visual_prompt_features)
        if self._graph is None:
            self._capture()  # on the real inputs just set: the warm-up runs must write finite cache entries
        self._graph.replay()
        self.graph_replays += 1
        return b["hidden"][0], b["logits"][0]

    def _allocate_buffers(self) -> dict[str, torch.Tensor]:
        """The graph's inputs, at fixed addresses: token id, position ids, attention mask row, prompt features."""
        b = {
            "ids": torch.zeros(1, 1, dtype=torch.long, device=self.device),
            "positions": torch.zeros(3, 1, 1, dtype=torch.long, device=self.device),
            "columns": torch.arange(self.max_len, device=self.device).view(1, 1, 1, self.max_len),
            "mask": torch.zeros(1, 1, 1, self.max_len, dtype=torch.bool, device=self.device),
        }
        if self._with_prompts:
            size = (1, self.model.config.num_visual_prompts, self.model.config.text_config.hidden_size)
            b["prompts"] = torch.zeros(size, dtype=self.model.lm_head.weight.dtype, device=self.device)
        return b

    def _capture(self) -> None:
        """Record one decode step on the current inputs.

        The warm-up runs really execute: they write this step's entry (and the next one's) into the cache, so
        the inputs must be real (a NaN anywhere in the cache would poison every later step, masked or not:
        0 × NaN is NaN), and the write position is restored afterwards.
        """
        b = self._buffers
        prompts = b.get("prompts")
        start = self.cache.layers[0].cumulative_length.clone()

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            return self.model.text_step(b["ids"], b["positions"], b["mask"], self.cache, prompts)

        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # kernel selection and lazy allocations happen outside the graph
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            b["hidden"], b["logits"] = step()
        for each in self.cache.layers:
            each.cumulative_length.copy_(start)
        self._graph, self._buffers = graph, b


__all__ = ["StaticDecoding"]
