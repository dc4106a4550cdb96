"""Structured outputs in the engine: every constrained output parses and validates (jsonschema for JSON,
re.fullmatch for regex, membership for choice, the grammar's own language for grammars), greedy and seeded, in
batches that mix constrained and free rows, under preemption, with async scheduling on and off; a free row's
tokens do not change because a constrained row shares its step; a bad constraint is refused before any step."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from jaxserve import AsyncEngine, SamplingParams, StructuredOutputsParams
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel

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
# one engine for the module: a pool small enough to preempt, and JSON without optional whitespace (vLLM's
# --structured-outputs-config option), so that the random tiny model finishes its objects
ENGINE = dict(
    max_model_len=128,
    max_num_seqs=8,
    max_num_batched_tokens=32,
    num_kv_pages=16,
    structured_outputs_config={"disable_any_whitespace": True},
)


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


# --- over HTTP -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(tiny_models, llm_cache):
    llm = llm_cache(tiny_models["tiny-llama"], TINY_ENGINE, **ENGINE)
    served = [ServedModel.from_engine(["llama"], "llama", AsyncEngine(llm.engine), "auto")]
    with background_server(served) as base:
        yield base
    served[0].engine.shutdown()


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    age: int = pydantic.Field(ge=0, le=120)


def test_openai_clients_get_outputs_that_validate(url):
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
def test_a_bad_constraint_is_a_400(url, extra, fragment):
    body = {"model": "llama", "prompt": "hi", "max_tokens": 4, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body)
    assert response.status_code == 400 and fragment in response.json()["error"]["message"], response.text
    assert httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2}).is_success
