"""Prompts to token ids (chat template included) and token ids back to text, incrementally."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

PROMPT_CONTEXT_TOKENS = 6
"""Prompt tokens kept as left context when detokenizing, so a first token's leading space is not lost."""


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template."""


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    """Apply the model's chat template (with the assistant generation prompt) to plain role/content dicts;
    ``tools`` go to templates that render tool definitions themselves."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("this model has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises TemplateError (e.g. roles must alternate) and others
        raise ChatTemplateError(f"cannot apply the chat template: {e}") from e
    return str(text)


def encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    """Text -> token ids. Chat prompts pass ``add_special_tokens=False``: the template already has them."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


class IncrementalDetokenizer:
    """Token ids -> text deltas in O(1) tokens of decoding per step (the prefix/read offsets of TGI and vLLM).

    A delta is released only when it does not end in a partial UTF-8 character (U+FFFD), so multi-token
    characters come out whole.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # Drop ids before the new prefix so that the work per token stays constant.
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever text is still held back (an unfinished character comes out as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
