"""Chat-message preparation (server/chat_utils.py): content-format detection and message normalization."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from server.chat_utils import (
    detect_content_format,
    last_message_text,
    prepare_messages,
    resolve_content_format,
)

ROOT = Path(__file__).resolve().parents[1]

# SmolLM2's ChatML template: content is concatenated as a string
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
OPENAI_DIRECT = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}"
)
OPENAI_ATTR = "{% for m in messages %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endfor %}"
OPENAI_ALIAS = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if content is string %}{{ content }}{% else %}{% for part in content %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{% endfor %}"
)
OPENAI_CHAINED_ALIAS = (
    "{% for message in messages %}{% set c1 = message.content %}{% set c2 = c1 %}"
    "{% for part in c2 | selectattr('type', 'equalto', 'text') %}{{ part.text }}{% endfor %}{% endfor %}"
)
OPENAI_MACRO = (
    "{% macro render(parts) %}{% for p in parts %}{{ p.text }}{% endfor %}{% endmacro %}"
    "{% for message in messages %}{{ render(message['content']) }}{% endfor %}"
)
OPENAI_LOOP_MESSAGES = (
    "{% set loop_messages = messages[1:] %}{% for msg in loop_messages %}"
    "{% for item in msg.content %}{% if item.type == 'text' %}{{ item.text }}{% break %}{% endif %}{% endfor %}"
    "{% endfor %}"
)
# loops, but never over content
STRING_TOOLS = (
    "{% for message in messages %}{{ message.content }}"
    "{% for call in message.tool_calls %}{{ call.function.name }}{% endfor %}{% endfor %}"
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, expected",
    [
        (CHATML, "string"),
        (STRING_TOOLS, "string"),
        (OPENAI_DIRECT, "openai"),
        (OPENAI_ATTR, "openai"),
        (OPENAI_ALIAS, "openai"),
        (OPENAI_CHAINED_ALIAS, "openai"),
        (OPENAI_MACRO, "openai"),
        (OPENAI_LOOP_MESSAGES, "openai"),
        ("{% for message in messages %}{{ message.content ", "string"),  # unparsable
        ("{% for x in %}", "string"),
        (None, "string"),
    ],
)
def test_detect_content_format(template, expected):
    assert detect_content_format(template) == expected


def test_resolve_content_format():
    assert resolve_content_format("auto", OPENAI_DIRECT) == "openai"
    assert resolve_content_format("auto", CHATML) == "string"
    assert resolve_content_format("auto", None) == "string"
    assert resolve_content_format("string", OPENAI_DIRECT) == "string"
    assert resolve_content_format("openai", CHATML) == "openai"
    with pytest.raises(ValueError, match="content format"):
        resolve_content_format("bogus", CHATML)


def _one(message: dict, content_format="string", template=CHATML) -> dict:
    (out,) = prepare_messages([message], content_format, template)
    return out


def test_roles_pass_through():
    for role in ("system", "user", "assistant", "tool", "narrator"):
        assert _one({"role": role, "content": "hi"})["role"] == role


def test_role_required():
    with pytest.raises(ValueError, match="role"):
        prepare_messages([{"content": "hi"}], "string", CHATML)


def test_developer_role():
    dev = {"role": "developer", "content": "be terse"}
    assert _one(dev)["role"] == "system"
    assert _one(dev, template=None)["role"] == "system"
    knows_developer = CHATML.replace("message['role']", "('developer' if message['role'] == 'developer' else 'x')")
    assert _one(dev, template=knows_developer)["role"] == "developer"


def test_string_format_content():
    assert _one({"role": "user", "content": "hello"})["content"] == "hello"
    assert _one({"role": "user", "content": None})["content"] == ""
    assert _one({"role": "assistant"})["content"] == ""
    parts = [
        {"type": "text", "text": "a"},
        "b",
        {"type": "input_text", "text": "c"},
        {"type": "output_text", "text": "d"},
        {"type": "refusal", "refusal": "e"},
        {"type": "thinking", "thinking": "f"},
    ]
    assert _one({"role": "user", "content": parts})["content"] == "a\nb\nc\nd\ne\nf"
    assert _one({"role": "user", "content": []})["content"] == ""


def test_openai_format_content():
    parts = [{"type": "text", "text": "a"}, "b", {"type": "refusal", "refusal": "c"}]
    out = _one({"role": "user", "content": parts}, "openai", OPENAI_DIRECT)
    assert out["content"] == [{"type": "text", "text": t} for t in "abc"]
    # a string becomes one text part, so templates that loop over content still see it
    assert _one({"role": "user", "content": "hi"}, "openai")["content"] == [{"type": "text", "text": "hi"}]
    assert _one({"role": "user", "content": None}, "openai")["content"] == []


def test_text_part_without_text_is_skipped():
    parts = [{"type": "text"}, {"type": "text", "text": "x"}]
    assert _one({"role": "user", "content": parts})["content"] == "x"


def test_tool_content_always_joined():
    parts = [{"type": "text", "text": "22C"}, {"type": "text", "text": "sunny"}]
    for fmt in ("string", "openai"):
        out = _one({"role": "tool", "tool_call_id": "call_1", "content": parts}, fmt)
        assert out["content"] == "22C\nsunny"
        assert out["tool_call_id"] == "call_1"
    assert _one({"role": "tool", "content": "ok"}, "openai")["content"] == "ok"


@pytest.mark.parametrize("part_type", ["image_url", "input_image", "input_audio", "video_url", "audio_embeds"])
def test_media_parts_rejected(part_type):
    part = {"type": part_type, part_type: {"url": "http://x/y"}}
    with pytest.raises(ValueError, match=f"text-only.*'{part_type}'"):
        _one({"role": "user", "content": [{"type": "text", "text": "look"}, part]})


def test_media_part_without_type_rejected():
    with pytest.raises(ValueError, match="text-only.*'image_url'"):
        _one({"role": "user", "content": [{"image_url": "http://x/y"}]})


def test_part_errors():
    with pytest.raises(ValueError) as err:
        _one({"role": "user", "content": [{"type": "file", "file": {}}]})
    assert str(err.value) == "Unsupported chat content part type: file"
    with pytest.raises(ValueError, match="Missing 'type'"):
        _one({"role": "user", "content": [{"text": "hi"}]})
    with pytest.raises(ValueError, match="must be a string"):
        _one({"role": "user", "content": [{"type": "text", "text": 3}]})
    with pytest.raises(ValueError, match="content"):
        _one({"role": "user", "content": 3})


def test_tool_call_arguments_decoded():
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{not json"}},
        {"id": "c", "type": "function", "function": {"name": "h", "arguments": "[1, 2]"}},
        {"id": "d", "type": "function", "function": {"name": "i", "arguments": {"x": 1}}},
        {"id": "e", "type": "function", "function": {"name": "j", "arguments": ""}},
    ]
    out = _one({"role": "assistant", "content": None, "tool_calls": calls})
    assert [call["function"]["arguments"] for call in out["tool_calls"]] == [{"city": "Paris"}, {}, {}, {"x": 1}, {}]
    assert [(call["id"], call["type"], call["function"]["name"]) for call in out["tool_calls"]] == [
        ("a", "function", "f"),
        ("b", "function", "g"),
        ("c", "function", "h"),
        ("d", "function", "i"),
        ("e", "function", "j"),
    ]


def test_empty_tool_calls_dropped():
    assert "tool_calls" not in _one({"role": "assistant", "content": "x", "tool_calls": []})
    assert "tool_calls" not in _one({"role": "assistant", "content": "x", "tool_calls": None})


def test_reasoning_alias():
    out = _one({"role": "assistant", "content": "4", "reasoning_content": "2+2"})
    assert out["reasoning"] == "2+2"
    assert out["reasoning_content"] == "2+2"  # kept for templates that read it (Qwen3)
    out = _one({"role": "assistant", "content": "4", "reasoning": "think", "reasoning_content": "other"})
    assert out["reasoning"] == "think"
    assert "reasoning" not in _one({"role": "assistant", "content": "4"})


def test_other_keys_kept():
    out = _one({"role": "user", "content": "hi", "name": "bob", "custom": {"k": 1}})
    assert out["name"] == "bob"
    assert out["custom"] == {"k": 1}


def test_input_not_mutated():
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": ["a", {"type": "text", "text": "b"}]},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "r",
            "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "1"}]},
    ]
    before = copy.deepcopy(messages)
    for fmt in ("string", "openai"):
        out = prepare_messages(messages, fmt, CHATML)
        assert messages == before
        assert all(new is not old for new, old in zip(out, messages))
        assert out[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}


def test_last_message_text():
    assert last_message_text([]) == ""
    assert last_message_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "b"
    assert last_message_text([{"role": "assistant", "content": None}]) == ""
    parts = ["x", {"type": "text", "text": "y"}, {"type": "image_url", "image_url": {"url": "u"}}]
    assert last_message_text([{"role": "user", "content": parts}]) == "x\ny"


def test_does_not_import_jax():
    source = (ROOT / "server" / "chat_utils.py").read_text()
    assert "import jax" not in source
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import server.chat_utils; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_prepared_messages_render():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}, {"role": "user", "content": "c"}]
    for template in (CHATML, OPENAI_DIRECT):
        fmt = detect_content_format(template)
        rendered = jinja2.Environment().from_string(template).render(messages=prepare_messages(messages, fmt, template))
        assert "a\nb" in rendered or "ab" in rendered
        assert "c" in rendered
