"""Request fields ``response_format``, ``tools``, ``tool_choice`` -> what to render, what to enforce, what to parse.

Enforcement (one grammar per request, see gateway/generation/constraint.py):
- ``tool_choice`` ``required`` or a named function: ``<tool_call>`` + a JSON list of calls + ``</tool_call>``,
  each call's ``arguments`` valid against its function's ``parameters`` (one call unless
  ``parallel_tool_calls``). This takes precedence over ``response_format``.
- otherwise ``response_format`` ``json_object`` (any JSON object) or ``json_schema`` (its schema, whatever
  ``strict`` says).
- ``tool_choice`` ``auto`` (the default with tools) enforces nothing; the output is scanned for calls.
- ``tool_choice`` ``none`` (the default without tools): tools are neither shown to the model nor parsed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from gateway.errors import InvalidRequestError
from gateway.generation.constraint import (
    Grammar,
    GrammarError,
    grammar_tokenizer,
    json_schema_grammar,
    tagged_json_grammar,
)
from gateway.generation.model import LoadedModel
from gateway.generation.tool_format import CLOSE_TAG, OPEN_TAG
from gateway.schemas.chat import ChatCompletionRequest, FunctionDefinition, NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    """Tools shown to the model (OpenAI wire form), the names calls may use, and how calls are read back."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    names: frozenset[str] = frozenset()
    forced: FunctionDefinition | None = None  # a named tool_choice
    required: bool = False
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return bool(self.names)


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
    """Validate ``tools`` and ``tool_choice`` against each other (400s name the offending field)."""
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise InvalidRequestError(
            "tool_choice requires tools; none were given", param="tool_choice", code="invalid_value"
        )
    names: dict[str, FunctionDefinition] = {}
    for i, tool in enumerate(tools):
        if tool.function.name in names:
            raise InvalidRequestError(
                f"duplicate tool name {tool.function.name!r}", param=f"tools[{i}].function.name", code="invalid_value"
            )
        names[tool.function.name] = tool.function
        check_schema(tool.function.parameters or {}, f"tools[{i}].function.parameters")
    if choice == "none":
        return ToolPlan()
    forced = None
    if isinstance(choice, NamedToolChoice):
        forced = names.get(choice.function.name)
        if forced is None:
            raise InvalidRequestError(
                f"tool_choice names function {choice.function.name!r}, which is not among the tools "
                f"({', '.join(sorted(names))})",
                param="tool_choice",
                code="invalid_value",
            )
    wire = [tool.model_dump(mode="json", exclude_none=True) for tool in tools]
    return ToolPlan(wire, frozenset(names), forced, choice == "required", req.parallel_tool_calls)


def check_schema(schema: dict[str, Any], param: str) -> None:
    """Reject what is not a valid JSON Schema (by the draft its ``$schema`` names, 2020-12 by default)."""
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise GrammarError(f"invalid JSON schema{f' at {where}' if where else ''}: {e.message}", param) from e


def grammar_source(req: ChatCompletionRequest, plan: ToolPlan) -> tuple[str, str] | None:
    """(llguidance grammar text, request field it came from), or None when nothing is enforced."""
    if plan.forced is not None or plan.required:
        functions = [plan.forced] if plan.forced is not None else [t.function for t in req.tools or []]
        parallel = plan.parallel and plan.forced is None  # a named function is called once, as OpenAI does
        return tagged_json_grammar(OPEN_TAG, calls_schema(functions, parallel), CLOSE_TAG), "tools"
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_schema_grammar({"type": "object"}), "response_format"
    if fmt.json_schema is None:
        raise InvalidRequestError(
            "response_format of type json_schema needs a json_schema object",
            param="response_format.json_schema",
            code="invalid_value",
        )
    param = "response_format.json_schema.schema"
    check_schema(fmt.json_schema.json_schema, param)
    try:
        return json_schema_grammar(fmt.json_schema.json_schema), param
    except GrammarError as e:
        raise GrammarError(e.message, param) from e


def calls_schema(functions: list[FunctionDefinition], parallel: bool) -> dict[str, Any]:
    """JSON schema of the list of calls: ``[{"name": <one of functions>, "arguments": <its parameters>}]``.

    ``$defs``/``definitions`` of the parameter schemas move to the root so that their ``#/...`` references
    still resolve there (the same name in two functions: the later one wins). Arguments not among the
    declared ``properties`` are ruled out unless ``additionalProperties`` says otherwise: a function would
    reject them, and small models otherwise invent endless extra ones.
    """
    defs: dict[str, dict[str, Any]] = {}
    variants = []
    for fn in functions:
        params = dict(fn.parameters or {})
        for key in ("$defs", "definitions"):
            defs.setdefault(key, {}).update(params.pop(key, {}))
        params.pop("$schema", None)
        params.setdefault("type", "object")
        if "properties" in params:
            params.setdefault("additionalProperties", False)
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn.name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
        "minItems": 1,
    }
    if not parallel:
        schema["maxItems"] = 1
    schema.update({key: value for key, value in defs.items() if value})
    return schema


async def compile_grammar(model: LoadedModel, req: ChatCompletionRequest, plan: ToolPlan) -> Grammar | None:
    """The request's grammar checked against the model's vocabulary (off the event loop), or None."""
    source = grammar_source(req, plan)
    if source is None:
        return None
    text, param = source

    def build() -> Grammar:
        tokenizer = grammar_tokenizer(model.tokenizer, model.vocab_size, sorted(model.eos_token_ids))
        return Grammar.compile(text, tokenizer, param)

    return await asyncio.to_thread(build)
