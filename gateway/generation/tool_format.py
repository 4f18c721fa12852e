"""How tools, tool calls and tool results are written into a prompt, and how calls are read back from text.

Chat templates that know about tools (their source mentions ``tools``) get the definitions through
``apply_chat_template(tools=...)``. For the others (SmolLM2's ChatML template among them) this module writes
them into the system prompt in the Hermes-style format that SmolLM2-Instruct saw in its function-calling data:

    <system prompt, if any>

    You can call these tools (JSON Schema definitions):
    <tools>
    [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}, ...]
    </tools>
    To call tools, reply with only <tool_call>[{"name": <name>, "arguments": <arguments object>}, ...]</tool_call>.
    Otherwise answer the user directly.

An assistant turn that called tools is rendered as that same ``<tool_call>[...]</tool_call>`` text (after its
content, if any); a ``tool`` message keeps the ``tool`` role with its content inside
``<tool_response>...</tool_response>``. Calls are read back from a ``<tool_call>`` block holding a JSON list
of calls (or one call object per block, as Qwen/Hermes templates write them).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
TOOLS_PREAMBLE = "You can call these tools (JSON Schema definitions):"
CALL_INSTRUCTIONS = (
    f'To call tools, reply with only {OPEN_TAG}[{{"name": <name>, "arguments": <arguments object>}}, ...]'
    f"{CLOSE_TAG}.\nOtherwise answer the user directly."
)


@dataclass(frozen=True)
class ParsedCall:
    """One call read back from generated text; ``arguments`` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_supports_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in str(chat_template)


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    """The block appended to the system prompt when the template cannot render tools itself."""
    return f"{TOOLS_PREAMBLE}\n<tools>\n{json.dumps(tools, ensure_ascii=False)}\n</tools>\n{CALL_INSTRUCTIONS}"


def call_text(tool_calls: list[dict[str, Any]]) -> str:
    """An assistant message's ``tool_calls`` (OpenAI wire form) -> ``<tool_call>[...]</tool_call>``."""
    calls = []
    for call in tool_calls:
        function = call.get("function") or {}
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass  # kept as the string the client sent
        calls.append({"name": function.get("name", ""), "arguments": arguments})
    return f"{OPEN_TAG}{json.dumps(calls, ensure_ascii=False)}{CLOSE_TAG}"


def inline_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Template-ready messages for a template without tool support: tools in the system prompt, calls and
    results as text (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        entry = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id", "name")}
        if message.get("tool_calls"):
            prefix = f"{message['content']}\n" if message.get("content") else ""
            entry["content"] = prefix + call_text(message["tool_calls"])
        elif message["role"] == "tool":
            entry["content"] = f"<tool_response>\n{message['content']}\n</tool_response>"
        out.append(entry)
    if tools:
        block = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def native_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template with tool support: call arguments as objects, as HF templates expect."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**call, "function": function})
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def parse_tool_calls(text: str, known: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """Generated text -> (content before the calls or None, calls). Text that holds no well-formed call of
    a known function comes back whole as content with no calls."""
    start = text.find(OPEN_TAG)
    if start < 0:
        return text, []
    calls: list[ParsedCall] = []
    rest = text[start:]
    while rest.startswith(OPEN_TAG):
        end = rest.find(CLOSE_TAG)
        body = rest[len(OPEN_TAG) : end if end >= 0 else len(rest)]
        parsed = _calls_from_json(body, known)
        if parsed is None:
            return text, []
        calls.extend(parsed)
        rest = rest[end + len(CLOSE_TAG) :].lstrip() if end >= 0 else ""
    if not calls or rest:
        return text, []
    content = text[:start].strip()
    return content or None, calls


def _calls_from_json(body: str, known: set[str]) -> list[ParsedCall] | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in known:
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ParsedCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


class ToolCallScanner:
    """Streams content while holding back everything from a ``<tool_call>`` tag on (and a tail that may
    still become one), so that calls are sent as tool-call deltas rather than text."""

    def __init__(self) -> None:
        self._held = ""
        self._in_call = False

    def push(self, text: str) -> str:
        """Add a text delta; return the part that is certainly content."""
        if self._in_call:
            self._held += text
            return ""
        buffer = self._held + text
        tag = buffer.find(OPEN_TAG)
        if tag >= 0:
            self._in_call, self._held = True, buffer[tag:]
            return buffer[:tag]
        keep = next((n for n in range(min(len(OPEN_TAG) - 1, len(buffer)), 0, -1) if buffer.endswith(OPEN_TAG[:n])), 0)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def finish(self, known: set[str]) -> tuple[str, list[ParsedCall]]:
        """At the end of the choice: (content still held, calls). An unparsable block, or one that calls a
        function not in ``known``, comes back as content."""
        held, self._held = self._held, ""
        if not self._in_call or not known:
            return held, []
        content, calls = parse_tool_calls(held, known)
        return ("", calls) if calls else (content or "", [])
