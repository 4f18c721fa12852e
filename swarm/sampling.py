"""Pure token-sampling functions on logits ``[B, V]`` (float32), shared by the HF-style API and the gateway.

Order of a decoding step (after gpt-fast's ``generate.py`` and OpenAI's documented semantics):

    scores = adjust_logits(logits, params, counts)   # logit_bias, presence/frequency penalties
    logprobs = log_softmax(scores)                   # what ``token_logprobs`` reports
    tokens = sample(scores, params, generator)       # temperature, top-k, top-p, then draw (argmax if T == 0)

Reported log-probabilities come from ``scores``: the model's distribution after logit bias and penalties but
*before* temperature, top-k and top-p, so they stay meaningful for greedy decoding and do not depend on the
truncation settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

NUCLEUS_PREFIX = 1024
"""Candidates top-p looks at first (widened when they hold less than p of the mass)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults are plain sampling at temperature 1."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of the chosen tokens and of the ``k`` most likely ones, per row."""

    chosen: torch.Tensor  # [B] float32
    top_values: torch.Tensor  # [B, k] float32, descending
    top_ids: torch.Tensor  # [B, k] int64


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    """Add ``bias[token]`` to every row's logit of ``token``; returns a new tensor."""
    # logits: [B, V]
    if not bias:
        return logits
    ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[:, ids] += values
    return out


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI penalties: ``logit -= frequency * count + presence * (count > 0)`` per row."""
    # logits: [B, V]; counts: [B, V], how often each row has generated each token so far
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def adjust_logits(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Logit bias, then penalties (when ``counts`` is given): the scores that logprobs are reported from."""
    scores = apply_logit_bias(logits, params.logit_bias)
    if counts is not None and params.uses_penalties:
        scores = apply_penalties(scores, counts, params.presence_penalty, params.frequency_penalty)
    return scores


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (which must be > 0; temperature 0 means greedy, handled in ``sample``)."""
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0 here, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value are kept); others become -inf."""
    # logits: [B, V]
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of top tokens whose probability mass reaches ``p``."""
    # logits: [B, V]
    if p >= 1.0:
        return logits
    vocab = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    # A full sort of a 50k vocabulary costs ~10 ms on a CPU; topk of a prefix is ~50x cheaper and exact
    # whenever that prefix already holds mass p (almost always), so widen it only when it does not.
    k = min(vocab, NUCLEUS_PREFIX)
    while True:
        top_probs, top_ids = torch.topk(probs, k, dim=-1)  # [B, k], descending
        if k == vocab or bool((top_probs.sum(-1) >= p).all()):
            break
        k = min(vocab, k * 8)
    mass_before = torch.cumsum(top_probs, dim=-1) - top_probs  # [B, k]; the top token always has 0 before it
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_ids, mass_before < p)  # [B, V]
    return logits.masked_fill(~keep, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from (already adjusted) logits ``[B, V]`` -> ``[B]`` int64."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    scores = apply_temperature(logits, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    scores = apply_top_p(scores, params.top_p)
    probs = torch.softmax(scores, dim=-1)  # [B, V]
    # Inverse-CDF draw with one uniform per row: O(V) and far cheaper on a CPU than torch.multinomial or an
    # exponential race over the whole vocabulary. Tokens with probability 0 can never be picked: the first
    # index whose cumulative mass exceeds u always adds mass of its own.
    cdf = torch.cumsum(probs, dim=-1)  # [B, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)  # [B, 1]
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # [B]
    return tokens.clamp_(max=probs.shape[-1] - 1)


def token_logprobs(scores: torch.Tensor, tokens: torch.Tensor, top_k: int = 0) -> TokenLogprobs:
    """Log-probabilities (log_softmax of ``scores``) of ``tokens`` [B] and of each row's ``top_k`` best."""
    # scores: [B, V]; tokens: [B]
    logprobs = torch.log_softmax(scores.float(), dim=-1)  # [B, V]
    chosen = logprobs.gather(-1, tokens.view(-1, 1)).squeeze(-1)  # [B]
    if top_k > 0:
        top = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
        top_values, top_ids = top.values, top.indices  # [B, k]
    else:
        top_values = logprobs.new_empty(logprobs.shape[0], 0)
        top_ids = torch.empty(logprobs.shape[0], 0, dtype=torch.long, device=logprobs.device)
    return TokenLogprobs(chosen=chosen, top_values=top_values, top_ids=top_ids)


def count_tokens(counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Add one generated token per row to ``counts`` [B, V] (in place; returns it)."""
    # counts: [B, V]; tokens: [B]
    counts.scatter_add_(-1, tokens.view(-1, 1), torch.ones_like(tokens.view(-1, 1), dtype=counts.dtype))
    return counts
