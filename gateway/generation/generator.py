"""The token loop: prefill the prompt, then sample and step one token at a time in one swarm session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from gateway.generation.constraint import Grammar, TokenConstraint, apply_token_bitmask
from gateway.generation.model import LoadedModel
from gateway.generation.protocols import SwarmClientLike
from gateway.generation.stops import StopMatcher
from gateway.generation.tokenization import IncrementalDetokenizer
from swarm import sampling
from swarm.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    """One request's decoding settings, already validated."""

    max_tokens: int
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the k best alternatives
    step_timeout_s: float | None = None
    grammar: Grammar | None = None  # every choice's output must match it (JSON schema, tool calls)


@dataclass(frozen=True)
class TokenInfo:
    """One sampled token, with its logprob and alternatives when they were asked for."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ChoiceUpdate:
    """What one step adds to one choice: text safe to show, the token, and the finish reason at the end."""

    index: int
    text: str
    token: TokenInfo
    finish_reason: str | None = None


class _Choice:
    """Text state of one choice: incremental detokenizer, stop strings, finish reason."""

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[int], stops: Sequence[str]):
        self._eos = model.eos_token_ids
        self._detok = IncrementalDetokenizer(model.tokenizer, prompt_ids)
        self._stops = StopMatcher(stops)
        self.finish_reason: str | None = None

    def push(self, token_id: int, last: bool) -> str:
        if token_id in self._eos:
            self.finish_reason = "stop"
            return self._drain()
        text = self._stops.push(self._detok.push(token_id))
        if self._stops.stopped:
            self.finish_reason = "stop"
        elif last:
            self.finish_reason = "length"
            text += self._drain()
        return text

    def _drain(self) -> str:
        text = self._stops.push(self._detok.flush())
        if self._stops.stopped:
            self.finish_reason = "stop"
        return text + self._stops.flush()


@dataclass
class _Picked:
    tokens: list[int]
    infos: list[TokenInfo]
    next_hidden: torch.Tensor | None  # [B, 1, D]


class _Sampler:
    """The per-request torch state (seeded generator, penalty counts); its methods run off the event loop."""

    def __init__(self, model: LoadedModel, params: GenerationParams):
        self._head = model.head
        self._device = model.device
        self._params = params
        self._generator = torch.Generator(device=model.device)
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)
        self._counts: torch.Tensor | None = None
        self._vocab_size = model.vocab_size

    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._head.embed(input_ids)  # [B, S, D]

    def pick(self, hidden: torch.Tensor, embed_next: bool, bitmask: torch.Tensor | None = None) -> _Picked:
        """Sample one token per row; ``bitmask`` [B, W] (a grammar's allowed tokens) masks the logits first."""
        params = self._params
        with torch.inference_mode():
            hidden = hidden[:, -1:].to(self._device)  # the swarm answers on the CPU; the head may be on a GPU
            logits = self._head.logits(hidden, last_only=True)[:, -1, :]  # [B, V]
            if bitmask is not None:
                logits = apply_token_bitmask(logits, bitmask)
            if params.sampling.uses_penalties and self._counts is None:
                self._counts = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
            scores = sampling.adjust_logits(logits, params.sampling, self._counts)
            tokens = sampling.sample(scores, params.sampling, self._generator)  # [B]
            if self._counts is not None:
                sampling.count_tokens(self._counts, tokens)
            token_list = tokens.tolist()
            infos = [TokenInfo(t) for t in token_list]
            if params.logprobs is not None:
                lp = sampling.token_logprobs(scores, tokens, params.logprobs)
                chosen, top_v, top_i = lp.chosen.tolist(), lp.top_values.tolist(), lp.top_ids.tolist()
                infos = [
                    TokenInfo(t, chosen[b], tuple(zip(top_i[b], top_v[b], strict=True)))
                    for b, t in enumerate(token_list)
                ]
            next_hidden = self._head.embed(tokens.view(-1, 1)) if embed_next else None  # [B, 1, D]
        return _Picked(token_list, infos, next_hidden)


async def generate(
    swarm: SwarmClientLike, model: LoadedModel, prompt_ids: Sequence[int], params: GenerationParams
) -> AsyncIterator[list[ChoiceUpdate]]:
    """Yield, per decoding step, the updates of the choices still running; stops when all have finished.

    The ``n`` choices run as one swarm session of batch size ``n``; a finished row keeps being fed (its
    output is ignored) until every row is done, since the session's batch size is fixed.
    """
    sampler = _Sampler(model, params)
    choices = [_Choice(model, prompt_ids, params.stop) for _ in range(params.n)]
    input_ids = torch.tensor([list(prompt_ids)] * params.n, dtype=torch.long, device=model.device)  # [B, S]
    hidden = await asyncio.to_thread(sampler.embed_prompt, input_ids)  # [B, S, D]
    variant = model.variant
    if variant is not None and variant.prompts is not None:  # tuned prompts go first, in embedding space
        hidden = torch.cat([variant.prompts.to(hidden.dtype).expand(params.n, -1, -1), hidden], dim=1)  # [B, K + S, D]
    masks = _MaskPipeline(params.grammar, params.n, model.vocab_size)
    max_length = hidden.shape[1] + params.max_tokens
    tuning = {"extras": variant.extras, "adapter": variant.adapter} if variant is not None else {}
    async with swarm.inference_session(model.model_id, max_length=max_length, batch_size=params.n, **tuning) as session:
        try:
            masks.start()  # the first mask is computed while the prompt goes through the swarm
            for step in range(params.max_tokens):
                async with asyncio.timeout(params.step_timeout_s):
                    out = await session.step(hidden)  # [B, S, D]
                last = step == params.max_tokens - 1
                picked = await asyncio.to_thread(sampler.pick, out, not last, await masks.result())
                updates = []
                for i, choice in enumerate(choices):
                    if choice.finish_reason is None:
                        text = choice.push(picked.tokens[i], last)
                        updates.append(ChoiceUpdate(i, text, picked.infos[i], choice.finish_reason))
                finished = [c.finish_reason is not None for c in choices]
                if all(finished) or picked.next_hidden is None:
                    yield updates
                    return
                # The next mask is computed while the updates go out and the next step is in flight.
                masks.advance(picked.tokens, finished)
                yield updates
                hidden = picked.next_hidden
        finally:
            await masks.aclose()


class _MaskPipeline:
    """Runs a TokenConstraint's work (building its matchers, then the masks) in a worker thread, overlapped
    with the swarm step (a no-op without a grammar). llguidance releases the GIL while it computes, so the
    event loop keeps serving."""

    def __init__(self, grammar: Grammar | None, batch_size: int, vocab_size: int):
        self._grammar, self._batch_size, self._vocab_size = grammar, batch_size, vocab_size
        self._constraint: TokenConstraint | None = None
        self._pending: asyncio.Task[torch.Tensor] | None = None

    def start(self) -> None:
        if self._grammar is not None:
            self._pending = asyncio.create_task(asyncio.to_thread(self._first_mask, self._grammar))

    def _first_mask(self, grammar: Grammar) -> torch.Tensor:
        self._constraint = TokenConstraint(grammar, self._batch_size, self._vocab_size)
        return self._constraint.fill()

    def advance(self, tokens: list[int], finished: list[bool]) -> None:
        if self._constraint is not None:
            self._pending = asyncio.create_task(asyncio.to_thread(self._constraint.advance, tokens, finished))

    async def result(self) -> torch.Tensor | None:
        """The mask for the step just taken (``[B, W]`` int32), or None without a grammar."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        return await pending

    async def aclose(self) -> None:
        """Wait out a mask still being computed, so its thread never outlives the request."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with contextlib.suppress(Exception):
                await pending
