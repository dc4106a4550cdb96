"""Chat-message preparation before a chat template is rendered, following vLLM's OpenAI server semantics."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2 import nodes

ContentFormat = Literal["string", "openai"]

# part type -> the field holding its text
_TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
_MEDIA_PARTS = (
    "image_url",
    "input_image",
    "image_embeds",
    "audio_url",
    "input_audio",
    "video_url",
    "audio_embeds",
    "video_embeds",
)


# ---------------------------------------------------------------------------------------------------------------------
# content-format detection


def _is_content_access(node: nodes.Node, names: set[str]) -> bool:
    """Whether `node` evaluates to a message's content: `x.content`, `x['content']`, `x.get('content')`, a name
    bound to one of those, or such a value passed through filters, slicing or a conditional."""
    if isinstance(node, nodes.Filter) and node.node is not None:
        return _is_content_access(node.node, names)
    if isinstance(node, nodes.Name):
        return node.name in names
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, nodes.Getitem):
        if isinstance(node.arg, nodes.Const):
            return node.arg.value == "content"
        return isinstance(node.arg, nodes.Slice) and _is_content_access(node.node, names)
    if isinstance(node, nodes.Call):
        callee = node.node
        return (
            isinstance(callee, nodes.Getattr)
            and callee.attr == "get"
            and bool(node.args)
            and isinstance(node.args[0], nodes.Const)
            and node.args[0].value == "content"
        )
    if isinstance(node, nodes.CondExpr):
        return _is_content_access(node.expr1, names) or (
            node.expr2 is not None and _is_content_access(node.expr2, names)
        )
    return False


def _content_bindings(ast: nodes.Template, names: set[str]) -> Iterator[str]:
    """Names newly bound to content: `{% set x = <content> %}` aliases and macro parameters passed content."""
    for assign in ast.find_all(nodes.Assign):
        if isinstance(assign.target, nodes.Name) and _is_content_access(assign.node, names):
            yield assign.target.name
    macros = {macro.name: [arg.name for arg in macro.args] for macro in ast.find_all(nodes.Macro)}
    for call in ast.find_all(nodes.Call):
        if not isinstance(call.node, nodes.Name) or call.node.name not in macros:
            continue
        params = macros[call.node.name]
        for param, arg in zip(params, call.args):
            if _is_content_access(arg, names):
                yield param
        for kwarg in call.kwargs:
            if kwarg.key in params and _is_content_access(kwarg.value, names):
                yield kwarg.key


@functools.lru_cache(maxsize=64)
def _detect(template: str) -> ContentFormat:
    try:
        ast = jinja2.Environment(extensions=[jinja2.ext.loopcontrols]).parse(template)
    except jinja2.TemplateError:
        return "string"
    names: set[str] = set()
    while new := set(_content_bindings(ast, names)) - names:
        names |= new
    if any(_is_content_access(loop.iter, names) for loop in ast.find_all(nodes.For)):
        return "openai"
    return "string"


def detect_content_format(template: str | None) -> ContentFormat:
    """Return "openai" when the template loops over a message's content (a list of parts), else "string"."""
    return "string" if template is None else _detect(template)


def resolve_content_format(flag: str, template: str | None) -> ContentFormat:
    """Resolve the `--chat-template-content-format` flag ("auto" | "string" | "openai")."""
    if flag == "auto":
        return detect_content_format(template)
    if flag in ("string", "openai"):
        return flag
    raise ValueError(f"Invalid chat template content format {flag!r}; expected 'auto', 'string' or 'openai'")


# ---------------------------------------------------------------------------------------------------------------------
# message normalization


def _part_text(part: Any) -> str | None:
    """The text of one content part (None for a text part without text); raises for media and unknown parts."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise ValueError(f"Chat content parts must be strings or objects, got {type(part).__name__}")
    part_type = part.get("type")
    if part_type is None:
        part_type = next((key for key in _MEDIA_PARTS if key in part), None)
        if part_type is None:
            raise ValueError("Missing 'type' field in chat content part")
    if not isinstance(part_type, str):
        raise ValueError("Invalid 'type' field in chat content part")
    if part_type in _MEDIA_PARTS:
        raise ValueError(f"This model is text-only and does not accept chat content parts of type {part_type!r}")
    if part_type not in _TEXT_PARTS:
        raise ValueError(f"Unsupported chat content part type: {part_type}")
    text = part.get(_TEXT_PARTS[part_type])
    if text is not None and not isinstance(text, str):
        raise ValueError(f"Field {_TEXT_PARTS[part_type]!r} of a {part_type!r} content part must be a string")
    return text


def _content_texts(content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ValueError(f"Message content must be a string, a list of parts or null, got {type(content).__name__}")
    return [text for text in map(_part_text, content) if text is not None]


def _tool_call(call: Any) -> Any:
    """A copy of a tool call with `function.arguments` as a dict, as chat templates expect."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = {}
    function["arguments"] = arguments if isinstance(arguments, dict) else {}
    return {**call, "function": function}


def _prepare_message(message: Any, content_format: ContentFormat, keep_developer: bool) -> dict:
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError("Every chat message needs a 'role'")
    out = dict(message)
    role = out["role"]
    if not isinstance(role, str):
        raise ValueError("A chat message's 'role' must be a string")
    if role == "developer" and not keep_developer:
        out["role"] = role = "system"

    texts = _content_texts(message.get("content"))
    if content_format == "openai" and role != "tool":
        out["content"] = [{"type": "text", "text": text} for text in texts]
    else:
        out["content"] = "\n".join(texts)

    if role == "assistant" and "tool_calls" in out:
        tool_calls = out.pop("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise ValueError("An assistant message's 'tool_calls' must be a list")
        if tool_calls:  # None and [] are dropped so templates take the plain-assistant path
            out["tool_calls"] = [_tool_call(call) for call in tool_calls]

    reasoning = out.get("reasoning")
    if reasoning is None:
        reasoning = out.get("reasoning_content")
    if reasoning is not None:
        # templates read either key (Qwen3 reads `reasoning_content`)
        out["reasoning"] = out["reasoning_content"] = reasoning
    return out


def prepare_messages(messages: list[dict], content_format: ContentFormat, template: str | None) -> list[dict]:
    """New message dicts ready for `apply_chat_template`: text-only content in `content_format`, tool-call
    arguments decoded, `reasoning_content` aliased to `reasoning`, "developer" mapped to "system" when the
    template does not know it. The input is left untouched."""
    keep_developer = template is not None and "developer" in template
    return [_prepare_message(message, content_format, keep_developer) for message in messages]


def last_message_text(messages: list[dict]) -> str:
    """The text of the last message's content (text parts joined with newlines), for chat `echo`."""
    content = messages[-1].get("content") if messages else None
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        text = part
        if isinstance(part, dict) and isinstance(part.get("type"), str):
            text = part.get(_TEXT_PARTS.get(part["type"], ""))
        if isinstance(text, str):
            texts.append(text)
    return "\n".join(texts)
