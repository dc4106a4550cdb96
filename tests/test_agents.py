"""What agent frameworks send: structured outputs, tool calling, reasoning and the Responses API.

In the engine: every constrained output parses and validates (jsonschema for JSON, re.fullmatch for regex,
membership for choice, the grammar's own language for grammars), greedy and seeded, in a batch that mixes
constrained and free rows, under preemption and async scheduling; a free row's tokens do not change because a
constrained row shares its step; a bad constraint is refused before any step; a reasoning model's grammar starts
after its thinking. Over HTTP, with the official `openai` client: response_format, parse(), structured_outputs and
the guided_* aliases; tool_choice "required" and a named function give tool calls whose arguments validate
against the tool's schema, whole and streamed (the deltas reassemble to the whole answer); the tools and a
history of calls reach a Hermes-style chat template; reasoning apart from content, whole and streamed; the
Responses API whole, parsed, streamed as its typed events, with function calls, previous_response_id and stored
responses; "auto" without the flags, bad constraints and unsupported Responses fields are 4xx."""

from __future__ import annotations

import dataclasses
import json
import re
import types
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from jaxserve import AsyncEngine, SamplingParams, StructuredOutputsParams
from jaxserve.reasoning import REASONING_PARSERS
from jaxserve.server.errors import APIError
from jaxserve.server.launch import background_server
from jaxserve.server.protocol import ChatCompletionRequest
from jaxserve.server.responses import ResponseStore, StoredResponse
from jaxserve.server.served_models import ServedModel
from jaxserve.server.settings import ServerSettings
from jaxserve.server.tool_calls import ToolCalling
from jaxserve.structured_outputs import GrammarCompiler

from .conftest import TINY_ENGINE

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,5}-\d{2,3}"
CHOICES = ["alpha", "beta", "gamma delta"]
GBNF = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'  # EBNF as llama.cpp writes it
LARK = 'start: "(" NUMBER ("," NUMBER)* ")"\nNUMBER: /[0-9]{1,3}/'
# a Hermes-style ChatML template (as Qwen2.5's, with the tools written short to fit the tiny context): the tools
# in the system turn, calls in <tool_call> tags, results in <tool_response> tags
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool.function.name }}"
    "({{ tool.function.parameters.properties | list | join(',') }}) {% endfor %}</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n{%- elif message.tool_calls %}<|im_start|>assistant\n{% for call in message.tool_calls %}"
    '<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# one engine for the module: a pool small enough to preempt, JSON without optional whitespace or properties beyond
# the schema's (vLLM's --structured-outputs-config options) so that the random tiny model finishes its objects,
# and the Hermes template
ENGINE = dict(
    max_model_len=256,
    max_num_seqs=8,
    max_num_batched_tokens=32,
    num_kv_pages=16,
    structured_outputs_config={"disable_any_whitespace": True, "disable_additional_properties": True},
    chat_template=HERMES_TEMPLATE,
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["CET", "UTC", "PST"]}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def constraints() -> list[tuple[StructuredOutputsParams, callable]]:
    """(constraint, check of a finished output's text)."""
    return [
        (StructuredOutputsParams(json=PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON)),
        (StructuredOutputsParams(json=json.dumps(PERSON)), lambda t: jsonschema.validate(json.loads(t), PERSON)),
        (StructuredOutputsParams(regex=REGEX), lambda t: _check(re.fullmatch(REGEX, t), t)),
        (StructuredOutputsParams(choice=CHOICES), lambda t: _check(t in CHOICES, t)),
        (StructuredOutputsParams(grammar=GBNF), lambda t: _check(re.fullmatch(r"(yes|no) [0-9]{1,2}", t), t)),
        (StructuredOutputsParams(grammar=LARK), lambda t: _check(re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", t), t)),
    ]  # fmt: skip


def _check(ok, text: str) -> None:
    assert ok, f"{text!r} breaks its constraint"


def _prompts(count: int) -> list[str]:
    return [f"Request {i}: answer in the format asked for." for i in range(count)]


def test_every_constrained_output_validates_in_a_mixed_batch_under_preemption(tiny_models, make_llm):
    """Under async scheduling (the default), so that a constrained row's wait for its last token is exercised."""
    llm = make_llm(tiny_models["tiny-llama"], **ENGINE)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cases = constraints()
    params = []
    for i, (constraint, _) in enumerate(cases):
        sampling = dict(temperature=0) if i % 2 == 0 else dict(temperature=1.0, seed=i, n=2)
        params.append(SamplingParams(max_tokens=60, structured_outputs=constraint, **sampling))
    prompts = _prompts(len(cases) + 4)
    outputs = llm.generate(prompts, params + [free] * 4, use_tqdm=False)
    for (_, check), output in zip(cases, outputs):
        for sample in output.outputs:
            assert sample.finish_reason == "stop", (sample.text, sample.finish_reason)
            check(sample.text)
    alone = llm.generate(prompts[len(cases) :], free, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[len(cases) :]] == [o.outputs[0].token_ids for o in alone]
    assert llm.engine.scheduler.num_preemptions > 0  # the small pool made the batch preempt


def test_a_bad_constraint_is_refused_before_any_step(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"], **ENGINE)
    for constraint, fragment in (
        (StructuredOutputsParams(json={"type": "frob"}), "frob"),
        (StructuredOutputsParams(json="{not json"), "not valid JSON"),
        (StructuredOutputsParams(regex="(abc"), "unclosed group"),
        (StructuredOutputsParams(grammar="start: missing_rule"), "missing_rule"),
        (StructuredOutputsParams(choice=[]), "non-empty list"),
    ):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=constraint))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="only use one kind"):
        StructuredOutputsParams(regex="a", choice=["a"])


def test_a_structural_tag_holds_only_the_tagged_part(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"], **ENGINE)
    compiler, tokenizer = llm.engine.grammar_compiler, llm.get_tokenizer()
    structure = {"begin": "<function=get_time>", "schema": SCHEMAS["get_time"], "end": "</function>"}
    tag = json.dumps({"structures": [structure], "triggers": ["<function="]})
    grammar = compiler.compile(StructuredOutputsParams(structural_tag=tag))

    def allowed(text: str) -> bool:
        matcher = compiler.matcher(grammar)
        for token in tokenizer.encode(text, add_special_tokens=False):
            matcher.accept(token)
        return matcher.error is None

    assert allowed('Sure, let me look. <function=get_time>{"zone": "CET"}</function> Done.')
    assert not allowed('Sure. <function=get_time>{"zone": "MARS"}</function>')


def test_strict_schemas_and_the_server_option_refuse_properties_beyond_the_schema(tiny_models, make_llm):
    """A strict tool or json_schema (and --structured-outputs-config's disable_additional_properties) closes every
    object that does not say otherwise; an open schema still takes extra properties."""
    llm = make_llm(tiny_models["tiny-llama"], **ENGINE)
    engine = llm.engine
    open_compiler = GrammarCompiler(engine.tokenizer.hf, engine.vocab_size, engine.eos_token_ids)
    extra = '{"zone":"CET","note":"x"}'

    def allowed(compiler: GrammarCompiler, params: StructuredOutputsParams, text: str) -> bool:
        matcher = compiler.matcher(compiler.compile(params))
        for token in engine.tokenizer.encode(text, add_special_tokens=False):
            matcher.accept(token)
        return matcher.error is None

    time_schema = StructuredOutputsParams(json=SCHEMAS["get_time"])  # says nothing of additionalProperties
    assert allowed(open_compiler, time_schema, extra)
    assert allowed(open_compiler, time_schema, '{"zone":"CET"}')
    strict = dataclasses.replace(time_schema, disable_additional_properties=True)
    assert not allowed(open_compiler, strict, extra)
    assert allowed(open_compiler, strict, '{"zone":"CET"}')
    assert not allowed(engine.grammar_compiler, time_schema, extra)  # the module's engine sets the server option
    strict_tool = {"type": "function", "function": {**TIME_TOOL["function"], "strict": True}}
    named = {"type": "function", "function": {"name": "get_time"}}
    for tools, closed in (([TIME_TOOL], False), ([strict_tool], True)):
        for choice in ("required", named):
            request = ChatCompletionRequest(model="m", messages=[], tools=tools, tool_choice=choice)
            constraint = ToolCalling.of(request, ServerSettings()).constraint()
            assert constraint.disable_additional_properties is closed


def test_a_reasoning_model_is_held_to_its_grammar_only_after_its_thinking(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"], reasoning_parser="deepseek_r1", **ENGINE)
    tokenizer = llm.get_tokenizer()
    digits = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[0-9]{12}"))
    thinking, answered = llm.generate(["Think about it:", "<think>done</think>Answer:"], digits, use_tqdm=False)
    assert not re.fullmatch("[0-9]*", thinking.outputs[0].text)  # still thinking: not held (no </think> came)
    assert re.fullmatch("[0-9]{12}", answered.outputs[0].text)  # the prompt closed the thinking: held from the start
    matcher = llm.engine.grammar_compiler.matcher(
        llm.engine.grammar_compiler.compile(StructuredOutputsParams(regex="[0-9]+")),
        waits_for=tokenizer.encode("</think>", add_special_tokens=False),
    )
    for token in tokenizer.encode("some thoughts</think>", add_special_tokens=False):
        assert not matcher.active
        matcher.accept(token)
    assert matcher.active


# --- over HTTP -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_models, llm_cache):
    llm = llm_cache(tiny_models["tiny-llama"], TINY_ENGINE, **ENGINE)
    served = [ServedModel.from_engine(["llama"], "llama", AsyncEngine(llm.engine), "auto")]
    # the server side of --reasoning-parser qwen3 (the engine's side, holding a grammar back, is tested above)
    served[0].reasoning_parser = REASONING_PARSERS["qwen3"]
    settings = ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")
    with background_server(served, settings) as base:
        yield base, served
    served[0].engine.shutdown()


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    age: int = pydantic.Field(ge=0, le=120)


def test_openai_clients_get_outputs_that_validate(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Who are you? Answer in JSON."}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answer = client.chat.completions.create(
        model="llama", messages=messages, response_format=schema_format, max_tokens=80, temperature=0
    )
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)

    parsed = client.chat.completions.parse(
        model="llama", messages=messages, response_format=Person, max_tokens=80, temperature=0.8, seed=3
    )
    assert isinstance(parsed.choices[0].message.parsed, Person)

    as_object = client.chat.completions.create(
        model="llama", messages=messages, response_format={"type": "json_object"}, max_tokens=80, temperature=0
    )
    if as_object.choices[0].finish_reason == "stop":  # any object: the random model may not close it in time
        assert isinstance(json.loads(as_object.choices[0].message.content), dict)
    else:
        assert as_object.choices[0].message.content.startswith("{")

    regex = {"structured_outputs": {"regex": REGEX}}
    whole = client.completions.create(model="llama", prompt="Code:", max_tokens=20, temperature=0, extra_body=regex)
    assert re.fullmatch(REGEX, whole.choices[0].text) and whole.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model="llama", prompt="Code:", max_tokens=20, temperature=0, extra_body=regex, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == whole.choices[0].text
    chosen = client.completions.create(
        model="llama", prompt="Pick:", max_tokens=20, temperature=0, extra_body={"guided_choice": CHOICES}
    )
    assert chosen.choices[0].text in CHOICES  # vLLM's older spelling still constrains


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"structured_outputs": {"json": {"type": "frob"}}}, "frob"),
        ({"structured_outputs": {"regex": "(abc"}}, "unclosed group"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "only use one kind"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
        ({"structured_outputs": {"choice": ["a"]}, "use_beam_search": True, "n": 2}, "beam search"),
    ],
)
def test_a_bad_constraint_is_a_400(server, extra, fragment):
    url, _ = server
    body = {"model": "llama", "prompt": "hi", "max_tokens": 4, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body)
    assert response.status_code == 400 and fragment in response.json()["error"]["message"], response.text
    assert httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2}).is_success


def _reassembled(stream) -> tuple[list[dict], str | None]:
    """The tool calls of a streamed chat, put back together from their deltas, and its finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                assert call["id"] is None, "the id comes once, first"
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
    return [calls[i] for i in sorted(calls)], finish


def test_required_and_named_tool_choice_give_calls_that_validate(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    ask = dict(model="llama", messages=messages, tools=TOOLS, max_tokens=150, temperature=0, parallel_tool_calls=False)
    required = client.chat.completions.create(tool_choice="required", **ask)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    streamed, finish = _reassembled(client.chat.completions.create(tool_choice="required", stream=True, **ask))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]

    named = {"type": "function", "function": {"name": "get_time"}}
    whole = client.chat.completions.create(tool_choice=named, **ask).choices[0]
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_time" and whole.message.content is None
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_time"])
    streamed, _ = _reassembled(client.chat.completions.create(tool_choice=named, stream=True, **ask))
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_time", call.function.arguments)]


def test_auto_tool_choice_and_a_history_of_calls_reach_the_template(server):
    url, served = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
    ]
    rendered = httpx.post(f"{url}/tokenize", json={"model": "llama", "messages": history, "tools": TOOLS}).json()[
        "tokens"
    ]
    text = served[0].tokenizer.decode(rendered)
    assert "<tools>get_weather(city,unit) get_time(zone) </tools>" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"' in text
    assert "<tool_response>-3 C</tool_response>" in text
    answer = client.chat.completions.create(model="llama", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")  # parsed by the hermes parser

    with background_server(served) as plain:  # without --enable-auto-tool-choice
        refused = httpx.post(
            f"{plain}/v1/chat/completions", json={"model": "llama", "messages": history, "tools": TOOLS}
        )
        assert refused.status_code == 400
        assert "--enable-auto-tool-choice" in refused.json()["error"]["message"]
        unknown = {"type": "function", "function": {"name": "nope"}}
        body = {"model": "llama", "messages": history, "tools": TOOLS, "tool_choice": unknown}
        assert "has not been passed" in httpx.post(f"{plain}/v1/chat/completions", json=body).json()["error"]["message"]


def test_a_reasoning_parser_splits_the_thinking_whole_and_streamed(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    shaped = {"structured_outputs": {"regex": "<think>[a-z]{2,6}</think>[A-Z][a-z]{2,6}"}}  # a thinking model's form
    ask = dict(model="llama", messages=[{"role": "user", "content": "Think, then answer."}], max_tokens=40)
    whole = client.chat.completions.create(temperature=0, extra_body=shaped, **ask).choices[0].message
    assert re.fullmatch("[a-z]{2,6}", whole.reasoning) and re.fullmatch("[A-Z][a-z]{2,6}", whole.content)
    chunks = list(client.chat.completions.create(temperature=0, extra_body=shaped, stream=True, **ask))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == whole.reasoning
    assert "".join(d.content or "" for d in deltas) == whole.content
    hidden = client.chat.completions.create(temperature=0, extra_body={**shaped, "include_reasoning": False}, **ask)
    assert hidden.choices[0].message.reasoning is None and hidden.choices[0].message.content == whole.content


# --- the Responses API ---------------------------------------------------------------------------------------


def test_responses_create_parse_and_stream(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    plain = client.responses.create(model="llama", input="Say hi.", max_output_tokens=12, temperature=0)
    assert plain.status in ("completed", "incomplete") and plain.output_text
    assert plain.usage.input_tokens > 0 and 0 < plain.usage.output_tokens <= 12
    assert [item.type for item in plain.output] == ["message"]

    parsed = client.responses.parse(
        model="llama", input="Who are you? Answer in JSON.", text_format=Person, max_output_tokens=80, temperature=0
    )
    assert isinstance(parsed.output_parsed, Person)

    events = list(
        client.responses.create(model="llama", input="Say hi.", max_output_tokens=12, temperature=0, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed == events[-1].response.output_text == plain.output_text  # greedy: the same text


def test_responses_call_tools_and_continue_from_a_stored_response(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    tools = [{"type": "function", **tool["function"]} for tool in TOOLS]
    first = client.responses.create(
        model="llama",
        input="What time is it in Berlin?",
        instructions="Use the tools.",
        tools=tools,
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=60,
        temperature=0,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_time" and call.call_id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_time"])
    assert client.responses.retrieve(first.id).output[0].call_id == call.call_id

    follow_up = client.responses.create(
        model="llama",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "09:00"}],
        max_output_tokens=8,
        temperature=0,
    )
    assert follow_up.previous_response_id == first.id
    assert follow_up.usage.input_tokens > first.usage.input_tokens  # the stored conversation came before it

    streamed = list(
        client.responses.create(
            model="llama",
            input="Weather?",
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=150,
            temperature=0,
            stream=True,
        )
    )
    done = [e.item for e in streamed if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert len(done) == 1 and done[0].name in SCHEMAS
    deltas = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert deltas == done[0].arguments
    jsonschema.validate(json.loads(done[0].arguments), SCHEMAS[done[0].name])


def test_responses_reasoning_items_and_errors(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    shaped = {"structured_outputs": {"regex": "<think>[a-z]{2,6}</think>[A-Z][a-z]{2,6}"}}
    answer = client.responses.create(
        model="llama", input="Think.", max_output_tokens=40, temperature=0, extra_body=shaped
    )
    assert [item.type for item in answer.output] == ["reasoning", "message"]
    assert re.fullmatch("[a-z]{2,6}", answer.output[0].content[0].text)
    for method, path, body, status in (
        ("get", "/v1/responses/resp_unknown", None, 404),
        ("post", f"/v1/responses/{answer.id}/cancel", None, 400),
        ("post", "/v1/responses", {"model": "llama", "input": "x", "background": True}, 400),
        ("post", "/v1/responses", {"model": "llama", "input": "x", "tools": [{"type": "web_search"}]}, 400),
        ("post", "/v1/responses", {"model": "llama", "input": "x", "previous_response_id": "resp_gone"}, 404),
    ):
        response = httpx.request(method, f"{url}{path}", json=body)
        assert response.status_code == status and response.json()["error"]["code"] == status, response.text


def test_stored_responses_past_the_capacity_go_oldest_first():
    """--max-stored-responses bounds the memory the Responses API keeps for previous_response_id."""
    store = ResponseStore(capacity=2)
    for name in ("resp_a", "resp_b", "resp_c"):
        store.put(StoredResponse(types.SimpleNamespace(id=name), messages=[]))
    assert store.get("resp_c").response.id == "resp_c" and store.get("resp_b").response.id == "resp_b"
    with pytest.raises(APIError) as gone:
        store.get("resp_a")
    assert gone.value.status == 404


def test_langchain_structured_output_tools_and_responses(server):
    """LangChain's ChatOpenAI, as agent code uses it: with_structured_output both ways, bind_tools whole and
    streamed, and the Responses API."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    @tool
    def get_time(zone: Literal["CET", "UTC"]) -> str:
        """The time in a zone."""
        return "09:00"

    url, _ = server
    settings = dict(base_url=f"{url}/v1", api_key="unused", model="llama", temperature=0, max_tokens=120)
    llm = langchain_openai.ChatOpenAI(**settings)
    for method in ("json_schema", "function_calling"):
        assert isinstance(llm.with_structured_output(Person, method=method).invoke("Who are you?"), Person)
    bound = llm.bind_tools([get_time], tool_choice="get_time", strict=True)
    (call,) = bound.invoke("What time is it?").tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("CET", "UTC")
    chunks = list(bound.stream("What time is it?"))
    assert sum(chunks[1:], chunks[0]).tool_calls[0]["args"] == call["args"]
    responses = langchain_openai.ChatOpenAI(use_responses_api=True, **settings)
    assert responses.invoke("Say hi.").text
