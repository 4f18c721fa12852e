"""Request fields -> validated GenerationParams (limits, context length, stop strings, logit bias)."""

from __future__ import annotations

from gateway.errors import ContextLengthExceededError, InvalidRequestError
from gateway.generation.generator import GenerationParams
from gateway.generation.model import LoadedModel
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.completions import CompletionRequest
from gateway.settings import GatewaySettings
from swarm.sampling import SamplingParams

MAX_STOP_STRINGS = 16


def build_params(
    settings: GatewaySettings,
    model: LoadedModel,
    prompt_len: int,
    req: ChatCompletionRequest | CompletionRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_param: str,
) -> GenerationParams:
    """Validate what pydantic cannot (limits that depend on settings and the model) and build the params."""
    if settings.max_prompt_tokens and prompt_len > settings.max_prompt_tokens:
        raise InvalidRequestError(
            f"the prompt has {prompt_len} tokens; this gateway allows at most {settings.max_prompt_tokens}",
            param=prompt_param,
            code="prompt_too_long",
        )
    if req.n > settings.max_n:
        raise InvalidRequestError(f"n must be at most {settings.max_n}", param="n", code="invalid_value")
    return GenerationParams(
        max_tokens=_max_tokens(settings, model, prompt_len, max_tokens, prompt_param),
        n=req.n,
        sampling=SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=_logit_bias(req.logit_bias, model.vocab_size),
        ),
        stop=_stops(req.stop),
        seed=req.seed,
        logprobs=logprobs,
        step_timeout_s=settings.request_timeout_s,
    )


def _max_tokens(
    settings: GatewaySettings, model: LoadedModel, prompt_len: int, requested: int | None, prompt_param: str
) -> int:
    room = model.context_length - prompt_len
    if requested is not None and requested > settings.max_tokens_limit:
        raise InvalidRequestError(
            f"max_tokens is {requested}; this gateway allows at most {settings.max_tokens_limit}",
            param="max_tokens",
            code="invalid_value",
        )
    wanted = requested if requested is not None else min(settings.max_tokens_default, room)
    if prompt_len == 0:
        raise InvalidRequestError("the prompt is empty", param=prompt_param, code="invalid_value")
    if room < 1 or wanted > room:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {model.context_length} tokens. However, you requested "
            f"{prompt_len + max(wanted, 1)} tokens ({prompt_len} in the prompt, {max(wanted, 1)} for the "
            "completion). Please reduce the prompt or the completion length.",
            param=prompt_param,
        )
    return wanted


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop", code="invalid_value")
    if any(not s for s in stops):
        raise InvalidRequestError("stop strings must not be empty", param="stop", code="invalid_value")
    return tuple(stops)


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"logit_bias key {key!r} is not a token id in [0, {vocab_size})",
                param="logit_bias",
                code="invalid_value",
            )
        if not -100 <= value <= 100:
            raise InvalidRequestError(
                f"logit_bias value {value} is outside [-100, 100]", param="logit_bias", code="invalid_value"
            )
        out[token] = float(value)
    return out
