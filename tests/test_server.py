"""The HTTP server, end to end: a real uvicorn server on a loopback port (one per module, several models
behind it), driven by the official `openai` client and by `httpx`."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from jaxserve import AsyncEngine, BeamSearchParams, SamplingParams
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel
from jaxserve.server.settings import ServerSettings

from .conftest import TINY_ENGINE, TINY_POOLING

BODY_LIMIT = 256 << 10
PROMPTS = [f"Story {i}: once upon a time" for i in range(10)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def llms(tiny_models, llm_cache):
    return {
        "llama": llm_cache(tiny_models["tiny-llama"], TINY_ENGINE),
        "qwen": llm_cache(tiny_models["tiny-qwen2"], TINY_ENGINE),
        "bert": llm_cache(tiny_models["tiny-bert-mean"], TINY_POOLING),
    }


@pytest.fixture(scope="module")
def offline(llms) -> dict[str, Any]:
    """Texts generated offline, before any AsyncEngine runs: an engine must not be stepped from two threads."""

    def greedy(key: str, prompt: str, max_tokens: int, defaults: bool = True) -> str:
        params = llms[key].get_default_sampling_params() if defaults else SamplingParams()
        params = params.clone(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return llms[key].generate(prompt, params, use_tqdm=False)[0].outputs[0].text

    return {
        "llama/0": greedy("llama", PROMPTS[0], 12),
        "llama/0/no-penalty": greedy("llama", PROMPTS[0], 12, defaults=False),
        "llama/4": greedy("llama", PROMPTS[4], 8),
        "qwen/4": greedy("qwen", PROMPTS[4], 8),
        "llama/4/beams": [
            seq.text for seq in llms["llama"].beam_search(PROMPTS[4], BeamSearchParams(3, 6))[0].sequences
        ],
    }


@pytest.fixture(scope="module")
def served(llms, offline, tiny_models):
    names = {"llama": ["llama", "llama-alias"], "qwen": ["qwen"], "bert": ["bert"]}
    folders = {"llama": "tiny-llama", "qwen": "tiny-qwen2", "bert": "tiny-bert-mean"}
    models = [
        ServedModel.from_engine(names[key], str(tiny_models[folders[key]]), AsyncEngine(llm.engine), "auto")
        for key, llm in llms.items()
    ]
    yield models
    for model in models:
        model.engine.shutdown()


@pytest.fixture(scope="module")
def url(served):
    settings = ServerSettings(max_request_bytes=BODY_LIMIT, enable_request_id_headers=True, max_num_queued_reqs=None)
    with background_server(served, settings) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].text if hasattr(c.choices[0], "text") else "" for c in chunks if c.choices)
    return text, chunks


# --- generation ----------------------------------------------------------------------------------------------


def test_completion_stream_equals_whole_and_usage_adds_up(client, llms, offline):
    whole = client.completions.create(
        model="llama", prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = whole.choices[0]
    # generation_config.json's repetition_penalty (1.1) applies to requests that don't set one (docs/architecture.md §7)
    assert llms["llama"].get_default_sampling_params().repetition_penalty == 1.1
    assert choice.text == offline["llama/0"]
    plain = client.completions.create(
        model="llama",
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        extra_body={"repetition_penalty": 1.0, "ignore_eos": True},
    )
    assert plain.choices[0].text == offline["llama/0/no-penalty"]
    assert choice.finish_reason == "length"
    prompt_tokens = len(llms["llama"].get_tokenizer().encode(PROMPTS[0]))
    assert whole.usage.prompt_tokens == prompt_tokens
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == prompt_tokens + 12
    assert whole.model == "llama" and whole.object == "text_completion" and whole.id.startswith("cmpl-")

    stream = client.completions.create(
        model="llama-alias",
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == prompt_tokens + 12
    assert all(c.model == "llama" for c in chunks)  # the first name, even when asked by an alias


def test_chat_stream_equals_whole_with_continuous_usage(client, llms):
    whole = client.chat.completions.create(model="llama", messages=CHAT, max_tokens=10, temperature=0)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    tokenizer = llms["llama"].get_tokenizer()
    prompt_ids = tokenizer.encode(tokenizer.render_chat(CHAT), add_special_tokens=False)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(
        model="llama",
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    running = [c.usage.completion_tokens for c in chunks[:-1]]
    assert all(u is not None for u in running) and running == sorted(running)


def test_logprobs_shapes(client):
    completion = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(1 <= len(top) <= 4 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)

    chat = client.chat.completions.create(
        model="llama", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top token
        assert bytes(entry.bytes).decode() == entry.token


def test_prompt_logprobs_are_returned(client):
    kwargs = dict(max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2})
    completion = client.completions.create(model="llama", prompt=PROMPTS[1], **kwargs)
    entries = completion.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == completion.usage.prompt_tokens
    assert all(2 <= len(entry) <= 3 and all(v["logprob"] <= 0 for v in entry.values()) for entry in entries[1:])
    chat = client.chat.completions.create(model="llama", messages=CHAT, **kwargs)
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_truncation_side_keeps_the_first_or_the_last_tokens(client, llms):
    ids = llms["llama"].get_tokenizer().encode(PROMPTS[1])
    for side, kept in (("left", ids[-4:]), ("right", ids[:4]), (None, ids[-4:])):
        body = {"truncate_prompt_tokens": 4, "return_token_ids": True, **({"truncation_side": side} if side else {})}
        completion = client.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=1, extra_body=body)
        assert completion.choices[0].model_extra["prompt_token_ids"] == kept
    chat = client.chat.completions.create(
        model="llama", messages=CHAT, max_tokens=1, extra_body={"truncate_prompt_tokens": 5, "truncation_side": "right"}
    )
    assert chat.usage.prompt_tokens == 5


def test_streamed_completion_chunks_carry_their_logprobs(url):
    body = {"model": "llama", "prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0, "logprobs": 2, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    carried = [chunk["choices"][0]["logprobs"] for chunk in chunks if chunk["choices"]]
    assert sum(len(lp["tokens"]) for lp in carried) == 5
    for lp in carried:
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])


def test_stream_chunks_say_what_they_are(url):
    for route, body, kind in (
        ("/v1/completions", {"prompt": "hi"}, "text_completion"),
        ("/v1/chat/completions", {"messages": CHAT}, "chat.completion.chunk"),
    ):
        with httpx.stream(
            "POST", f"{url}{route}", json={"model": "llama", "max_tokens": 3, "stream": True, **body}
        ) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks and all(chunk["object"] == kind for chunk in chunks)


def test_echo_prepends_the_prompt_with_its_logprobs(client):
    result = client.completions.create(
        model="llama", prompt=PROMPTS[2], max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    choice = result.choices[0]
    assert choice.text.startswith(PROMPTS[2])
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == result.usage.prompt_tokens + 4


def test_chat_continues_the_final_message_and_echoes_it(client):
    messages = [*CHAT, {"role": "assistant", "content": "Once upon"}]
    extra = {"add_generation_prompt": False, "continue_final_message": True, "echo": True}
    result = client.chat.completions.create(
        model="llama", messages=messages, max_tokens=4, temperature=0, extra_body=extra
    )
    message = result.choices[0].message
    assert message.role == "assistant" and message.content.startswith("Once upon")
    plain = client.chat.completions.create(
        model="llama", messages=messages, max_tokens=4, temperature=0, extra_body={**extra, "echo": False}
    )
    assert message.content == "Once upon" + plain.choices[0].message.content


def test_n_seed_and_stop(client):
    kwargs = dict(model="llama", prompt=PROMPTS[3], max_tokens=10, temperature=1.0, seed=1234, n=3)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == sum(
        len(c.token_ids) for c in client.completions.create(**kwargs, extra_body={"return_token_ids": True}).choices
    )

    greedy = client.completions.create(
        model="llama", prompt=PROMPTS[3], max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    text = greedy.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(model="llama", prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].stop_reason == stop
    assert cut.choices[0].text == text[: text.index(stop)]


def test_beam_search_over_http_equals_offline(client, offline):
    kwargs = dict(model="llama", prompt=PROMPTS[4], max_tokens=6, n=3, extra_body={"use_beam_search": True})
    whole = client.completions.create(**kwargs)
    assert [c.text for c in whole.choices] == offline["llama/4/beams"]
    assert whole.usage.completion_tokens > 0
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == offline["llama/4/beams"]
    chat = client.chat.completions.create(
        model="llama", messages=CHAT, max_tokens=4, n=2, extra_body={"use_beam_search": True, "length_penalty": 0.0}
    )
    assert len(chat.choices) == 2 and all(c.message.content is not None for c in chat.choices)


def test_several_prompts_in_one_completion(client):
    result = client.completions.create(model="llama", prompt=PROMPTS[:3], max_tokens=4, temperature=0)
    assert [c.index for c in result.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS[:3], result.choices):
        alone = client.completions.create(model="llama", prompt=prompt, max_tokens=4, temperature=0)
        assert choice.text == alone.choices[0].text


def test_routing_by_model(client, offline):
    for name in ("llama", "qwen"):
        result = client.completions.create(
            model=name, prompt=PROMPTS[4], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert result.model == name
        assert result.choices[0].text == offline[f"{name}/4"]
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"llama", "llama-alias", "qwen", "bert"}
    assert models["llama"].max_model_len == TINY_ENGINE["max_model_len"]


# --- tokenizer routes ----------------------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(url, llms):
    tokenizer = llms["qwen"].get_tokenizer()
    text = "Hello, wörld! 1 2 3"
    tokens = httpx.post(f"{url}/tokenize", json={"model": "qwen", "prompt": text, "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer.encode(text)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == TINY_ENGINE["max_model_len"]
    assert tokens["token_strs"] == tokenizer.hf.convert_ids_to_tokens(tokens["tokens"])
    back = httpx.post(f"{url}/detokenize", json={"model": "qwen", "tokens": tokens["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(tokens["tokens"], skip_special_tokens=False)}

    chat = httpx.post(f"{url}/tokenize", json={"model": "qwen", "messages": CHAT}).json()
    assert chat["tokens"] == tokenizer.encode(tokenizer.render_chat(CHAT), add_special_tokens=False)


# --- errors --------------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["word"] * 400)
ERROR_CASES = [
    # (route, body, status, type, param, message fragment)
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "NotFoundError", "model", "Valid aliases: llama"),
    ("/v1/completions", {"model": "llama"}, 400, "Bad Request", "body.prompt", "1 validation error"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "temperature": "hot"}, 400, "Bad Request", None, "float"),
    # strict types, as documented: no coercion of a string to an integer nor of a number to a boolean
    ("/v1/completions", {"model": "llama", "prompt": "x", "max_tokens": "5"}, 400, "Bad Request", None, "valid integer"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "echo": 1}, 400, "Bad Request", None, "valid boolean"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "stop": list("abcde")}, 400, "Bad Request", None, "at most 4"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "temperature": 3}, 400, "BadRequestError", None, "[0, 2]"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "n": 2, "temperature": 0}, 400, "BadRequestError", None,
     "greedy"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "logprobs": 30}, 400, "BadRequestError", None,
     "max allowed: 20"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "max_tokens": 100000}, 400, "BadRequestError", None,
     "cannot be greater than max_model_len=256"),
    ("/v1/completions", {"model": "llama", "prompt": LONG_PROMPT}, 400, "BadRequestError", "input_tokens",
     "This model's maximum context length is 256 tokens"),
    ("/v1/completions", {"model": "llama", "prompt": ""}, 400, "BadRequestError", "prompt", "empty"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "BadRequestError", "stream_options", "stream=True"),
    ("/v1/completions", {"model": "bert", "prompt": "x"}, 400, "BadRequestError", "model", "does not support"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "priority": 3}, 400, "BadRequestError", None,
     "Got priority 3 but Priority scheduling is not enabled."),
    ("/v1/completions", {"model": "llama", "prompt": "x", "stop_token_ids": [10**6]}, 400, "BadRequestError", None,
     "stop_token_ids must be token ids"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "seed": 2**63}, 400, "Bad Request", "body.seed",
     "less than or equal to 9223372036854775807"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "n": 129}, 400, "BadRequestError", "n",
     "n must be at most 128"),
    ("/v1/chat/completions", {"model": "llama", "messages": CHAT, "min_tokens": 1000000}, 400, "BadRequestError",
     None, "min_tokens must be less than or equal to max_tokens"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "use_beam_search": True, "logprobs": 1}, 400,
     "BadRequestError", "logprobs", "beam search"),
    ("/v1/completions", {"model": "llama", "prompt": "x", "cache_salt": ""}, 400, "BadRequestError", "cache_salt",
     "non-empty"),
    ("/v1/chat/completions", {"model": "llama", "messages": CHAT, "add_generation_prompt": True,
     "continue_final_message": True}, 400, "BadRequestError", None, "Cannot set both"),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": [{"type": "bogus"}]}]},
     400, "BadRequestError", None, "Unsupported chat content part type: bogus"),
    ("/v1/chat/completions", {"model": "llama", "messages": CHAT, "chat_template": "{{ 1 }}"}, 400,
     "BadRequestError", "chat_template", "--trust-request-chat-template"),
    ("/v1/chat/completions", {"model": "llama", "messages": CHAT, "top_logprobs": 2}, 400, "BadRequestError",
     "top_logprobs", "logprobs"),
    ("/tokenize", {"model": "bert", "messages": CHAT}, 400, "BadRequestError", None, "chat template"),
    ("/detokenize", {"model": "llama", "tokens": [-1]}, 400, "Bad Request", None, "non-negative"),
    ("/detokenize", {"model": "llama", "tokens": [False]}, 400, "Bad Request", "body.tokens.0", "valid integer"),
    ("/tokenize", {"model": "llama", "prompt": "x", "return_token_strs": 0}, 400, "Bad Request", None, "valid boolean"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "status", "kind", "param", "fragment"), ERROR_CASES)
def test_error_envelope_then_the_next_request_works(url, route, body, status, kind, param, fragment):
    response = httpx.post(f"{url}{route}", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == status
    assert fragment in error["message"]
    if param is not None:
        assert error["param"] == param
    ok = httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_transport_level_errors(url):
    bad_json = httpx.post(f"{url}/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "Bad Request"
    text = httpx.post(f"{url}/v1/completions", content=b"{}", headers={"content-type": "text/plain"})
    assert text.status_code == 400 and "Unsupported Media Type" in text.json()["error"]["message"]
    too_big = httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "x" * (BODY_LIMIT + 1)})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == 413

    def chunked():
        yield b'{"model": "llama", "prompt": "'
        yield b"x" * (BODY_LIMIT + 1)
        yield b'"}'

    too_big_chunked = httpx.post(
        f"{url}/v1/completions", content=chunked(), headers={"content-type": "application/json"}
    )
    assert too_big_chunked.status_code == 413
    for response, status in ((httpx.get(f"{url}/no/such/route"), 404), (httpx.get(f"{url}/v1/completions"), 405)):
        assert response.status_code == status and response.json()["error"]["code"] == status  # the envelope
    assert httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2}).is_success


def _raw_exchange(base: str, parts: list[bytes], pause: float) -> bytes:
    """Send `parts` over a raw connection with `pause` seconds between them; what the server sent until it closed."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            for part in parts:
                sock.sendall(part)
                time.sleep(pause)
        except OSError:  # closed on us mid-send
            pass
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_slow_clients_time_out_with_a_408(served):
    settings = ServerSettings(request_header_timeout=0.6, request_body_timeout=0.6)
    with background_server(served, settings) as base:
        trickled_headers = [b"POST /v1/completions HTTP/1.1\r\n", *(b"X-Slow: %d\r\n" % i for i in range(6))]
        started = time.monotonic()
        answer = _raw_exchange(base, trickled_headers, pause=0.25)
        assert answer.startswith(b"HTTP/1.1 408") and b'"code": 408' in answer
        assert time.monotonic() - started < 5
        silent = _raw_exchange(base, [], pause=0)  # opened and never wrote
        assert silent.startswith(b"HTTP/1.1 408")
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n"
        )
        trickled_body = _raw_exchange(base, [head, *(b" " for _ in range(6))], pause=0.25)
        assert trickled_body.startswith(b"HTTP/1.1 408") and b"request body" in trickled_body
        with httpx.Client(base_url=base) as http:  # kept alive past the header deadline, then used again
            assert http.post("/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2}).is_success
            time.sleep(1.0)
            assert http.get("/v1/models").is_success


@pytest.mark.parametrize(
    "body",
    [
        {"model": "llama", "prompt": "\ud800 lone surrogate", "max_tokens": 2},
        {"model": "llama", "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2},
        {"model": "llama", "messages": CHAT, "chat_template_kwargs": {"tokenize": True}, "max_tokens": 2},
    ],
)
def test_a_bad_request_keeps_the_connection(url, body):
    """A 400 raised while preparing a request (TypeError, UnicodeError) is an ordinary response: the next
    request on the same connection is answered."""
    host, port = url.removeprefix("http://").split(":")
    bad_route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    good = {"model": "llama", "prompt": "hi", "max_tokens": 2}
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        replies = sock.makefile("rb")
        for route, payload, expected in ((bad_route, body, 400), ("/v1/completions", good, 200)):
            data = json.dumps(payload).encode()
            head = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
            sock.sendall(head.encode() + b"\r\n\r\n" + data)
            status = int(replies.readline().split()[1])
            headers = {}
            while line := replies.readline().strip():
                key, value = line.decode().split(":", 1)
                headers[key.lower()] = value.strip()
            answer = json.loads(replies.read(int(headers["content-length"])))
            assert status == expected and headers.get("connection") != "close", answer
        assert answer["choices"][0]["text"] is not None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
FUZZED_ROUTES = {
    "/v1/completions": {"model": "llama", "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": "llama", "messages": CHAT, "max_tokens": 2},
    "/v1/embeddings": {"model": "bert", "input": "hi"},
    "/pooling": {"model": "bert", "input": "hi"},
    "/score": {"model": "bert", "queries": "a", "documents": ["b"]},
    "/rerank": {"model": "bert", "query": "a", "documents": ["b"]},
    "/tokenize": {"model": "llama", "prompt": "hi"},
    "/detokenize": {"model": "llama", "tokens": [1, 2]},
    "/invocations": {"model": "llama", "prompt": "hi", "max_tokens": 2},
}


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(sorted(FUZZED_ROUTES)), field=st.text(max_size=12) | st.sampled_from(
    ["prompt", "messages", "input", "max_tokens", "n", "temperature", "logprobs", "top_logprobs", "stop", "seed",
     "logit_bias", "tokens", "documents", "query", "queries", "dimensions", "encoding_format", "min_tokens",
     "truncate_prompt_tokens", "stream", "use_beam_search", "priority", "response_format", "top_k"]
), value=JSON_VALUES)  # fmt: skip
def test_any_json_in_any_field_is_answered_without_a_5xx(url, route, field, value):
    """Arbitrary JSON in one field of an otherwise valid body: 200 or a 4xx in the envelope, never a 5xx."""
    body = {**FUZZED_ROUTES[route], field: value}
    if field in ("max_tokens", "n") and isinstance(value, int) and value > 4:
        body[field] = 4  # keep the work small; the bounds are tested elsewhere
    response = httpx.post(f"{url}{route}", json=body, timeout=60)
    assert response.status_code < 500, (route, body, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["code"] == response.status_code


# --- utility routes, headers, metrics ------------------------------------------------------------------------


def test_health_version_load_and_request_ids(url):
    for path in ("/health", "/ping"):
        response = httpx.get(f"{url}{path}")
        assert response.status_code == 200 and response.content == b""
    assert httpx.post(f"{url}/ping").status_code == 200
    assert "version" in httpx.get(f"{url}/version").json()
    assert httpx.get(f"{url}/load").json() == {"server_load": 0}

    given = httpx.post(
        f"{url}/v1/completions",
        json={"model": "llama", "prompt": "hi", "max_tokens": 2},
        headers={"X-Request-Id": "abc123"},
    )
    assert given.headers["x-request-id"] == "abc123" and given.json()["id"] == "cmpl-abc123"
    fresh = httpx.get(f"{url}/v1/models")
    assert len(fresh.headers["x-request-id"]) == 32


def test_metrics_parse_and_count(url, client):
    before = _metric_values(url)
    client.chat.completions.create(model="qwen", messages=CHAT, max_tokens=3, temperature=0)
    after = _metric_values(url)
    key = ("vllm:generation_tokens_total", "qwen")
    assert after[key] - before.get(key, 0) == 3
    assert after[("vllm:e2e_request_latency_seconds_count", "qwen")] >= 1
    assert after[("vllm:time_to_first_token_seconds_count", "qwen")] >= 1
    assert after[("vllm:num_requests_running", "llama")] == 0
    assert after[("vllm:kv_cache_usage_perc", "llama")] == 0
    assert after[("jaxserve:compiles_after_warmup_total", "llama")] == 0

    def grew(name: str) -> float:
        return after[(name, "qwen")] - before.get((name, "qwen"), 0)

    for phase in ("queue", "prefill", "decode", "inference"):  # the engine's timeline of the one request
        assert grew(f"vllm:request_{phase}_time_seconds_count") == 1, phase
    assert 0 < grew("vllm:request_decode_time_seconds_sum") <= grew("vllm:request_inference_time_seconds_sum")
    assert grew("vllm:request_num_preemptions_count") == 1 and grew("vllm:request_num_preemptions_sum") == 0
    assert grew("vllm:request_params_n_count") == 1 and grew("vllm:request_params_max_tokens_sum") == 3
    assert grew("vllm:iteration_tokens_total_count") >= 3 and grew("vllm:iteration_tokens_total_sum") >= 3
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    by_reason = "vllm:num_requests_waiting_by_reason"
    waiting = {(s.labels["model_name"], s.labels["reason"]): s.value for s in families[by_reason].samples}
    assert waiting[("qwen", "capacity")] == waiting[("qwen", "deferred")] == 0
    (info,) = [s for s in families["vllm:cache_config_info"].samples if s.labels["model_name"] == "llama"]
    assert info.value == 1 and info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "128"


def test_prefix_cache_counts_hits_and_resets(url, client):
    prompt = " ".join(["the quick brown fox"] * 12)
    client.completions.create(model="qwen", prompt=prompt, max_tokens=1, temperature=0)
    before = _metric_values(url)
    client.completions.create(model="qwen", prompt=prompt, max_tokens=1, temperature=0)
    after = _metric_values(url)
    queries, hits = ("vllm:prefix_cache_queries_total", "qwen"), ("vllm:prefix_cache_hits_total", "qwen")
    assert after[hits] - before[hits] >= 32 and after[queries] > before[queries]
    salted = client.completions.create(
        model="qwen", prompt=prompt, max_tokens=1, temperature=0, extra_body={"cache_salt": "tenant-a"}
    )
    assert _metric_values(url)[hits] == after[hits] and salted.choices[0].finish_reason == "length"
    assert httpx.post(f"{url}/reset_prefix_cache").status_code == 200
    client.completions.create(model="qwen", prompt=prompt, max_tokens=1, temperature=0)
    assert _metric_values(url)[hits] == after[hits]


def _metric_values(url: str, by_reason: bool = False) -> dict[tuple, float]:
    """Sample values by (name, model); with `by_reason`, only `request_success` by (name, model, reason)."""
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            reason = sample.labels.get("finished_reason")
            if by_reason and reason is not None:
                values[(sample.name, sample.labels["model_name"], reason)] = sample.value
            elif not by_reason and reason is None and "le" not in sample.labels:
                values[(sample.name, sample.labels.get("model_name"))] = sample.value
    return values


# --- under load ----------------------------------------------------------------------------------------------


def test_fifty_concurrent_streams_each_get_their_text_alone(url, client):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(50)]
    body = dict(model="llama", max_tokens=8, temperature=0, ignore_eos=True)
    alone = {
        p: httpx.post(f"{url}/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"] for p in PROMPTS
    }

    async def one(http: httpx.AsyncClient, prompt: str) -> str:
        text, done = "", False
        async with http.stream("POST", f"{url}/v1/completions", json={**body, "prompt": prompt, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert done
        return text

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=60)) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    assert asyncio.run(main()) == [alone[p] for p in prompts]


def test_a_client_that_disconnects_mid_stream_frees_its_pages(url, llms):
    engine = llms["llama"].engine
    body = {"model": "llama", "prompt": PROMPTS[5], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.page_pool.num_free < engine.page_pool.num_pages
    deadline = time.monotonic() + 20
    while engine.has_unfinished_requests() or engine.page_pool.num_free < engine.page_pool.num_pages:
        assert time.monotonic() < deadline, "the aborted request kept its pages"
        time.sleep(0.02)


def test_a_client_that_disconnects_while_waiting_aborts_a_whole_response(url, llms):
    engine = llms["llama"].engine
    aborted = ("vllm:request_success_total", "llama", "abort")
    before = _metric_values(url, by_reason=True).get(aborted, 0)
    body = {"model": "llama", "prompt": PROMPTS[6], "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.1)
    deadline = time.monotonic() + 20
    while engine.has_unfinished_requests() or engine.page_pool.num_free < engine.page_pool.num_pages:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.02)
    assert _metric_values(url, by_reason=True)[aborted] == before + 1


def test_full_queue_answers_503_with_retry_after(served):
    with background_server(served, ServerSettings(max_num_queued_reqs=2)) as base:
        body = {"model": "llama", "prompt": PROMPTS[7], "max_tokens": 16, "ignore_eos": True}

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as http:
                return await asyncio.gather(*(http.post(f"{base}/v1/completions", json=body) for _ in range(30)))

        responses = asyncio.run(main())
        busy = [r for r in responses if r.status_code == 503]
        assert busy and all(r.headers["retry-after"] == "1" for r in busy)
        # the 8 sequence slots of the engine and the 2 queued places all take a request: only the rest wait
        assert len(responses) - len(busy) >= TINY_ENGINE["max_num_seqs"] + 2
        assert all(r.json()["error"]["type"] == "Service Unavailable" for r in busy)
        assert all(r.status_code in (200, 503) for r in responses)
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200


# --- auth, CORS, root path -----------------------------------------------------------------------------------


def test_api_key_cors_and_root_path(served):
    settings = ServerSettings(
        api_keys=["sk-one", "sk-two"],
        enable_request_id_headers=True,
        allowed_origins=["http://app.example"],
        root_path="/prefix",
    )
    with background_server(served, settings) as base:
        denied = httpx.get(f"{base}/v1/models", headers={"X-Request-Id": "denied"})
        assert denied.status_code == 401 and denied.json() == {"error": "Unauthorized"}
        assert denied.headers["x-request-id"] == "denied"
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "bearer sk-two"}).status_code == 200
        # behind a proxy that keeps /prefix, or one that strips it; the API documents itself under it
        kept = httpx.get(f"{base}/prefix/v1/models", headers={"Authorization": "Bearer sk-one"})
        assert kept.status_code == 200 and kept.json()["data"]
        assert httpx.get(f"{base}/prefix/v1/models").status_code == 401
        assert httpx.get(f"{base}/openapi.json").json()["servers"] == [{"url": "/prefix"}]
        assert httpx.get(f"{base}/health").status_code == 200  # outside /v1: open
        keyed = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-one", max_retries=0)
        assert keyed.completions.create(model="llama", prompt="hi", max_tokens=2).choices[0].text is not None

        preflight = httpx.options(
            f"{base}/v1/completions",
            headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(
            f"{base}/v1/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
        assert httpx.post(f"{base}/tokenize", json={"model": "llama", "prompt": "hi"}).status_code == 200  # vLLM's


def test_api_key_on_every_route_is_checked_before_the_body(served):
    settings = ServerSettings(api_keys=["sk-one"], api_key_all_routes=True, max_request_bytes=BODY_LIMIT)
    with background_server(served, settings) as base:
        assert httpx.post(f"{base}/tokenize", json={"model": "llama", "prompt": "hi"}).status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200 and httpx.get(f"{base}/metrics").status_code == 200
        key = {"Authorization": "Bearer sk-one"}
        assert httpx.post(f"{base}/tokenize", json={"model": "llama", "prompt": "hi"}, headers=key).status_code == 200

        def chunked():
            yield b'{"model": "llama", "prompt": "'
            yield b"x" * (BODY_LIMIT + 1)
            yield b'"}'

        unkeyed = httpx.post(f"{base}/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert unkeyed.status_code == 401  # refused before the oversized body is read


def test_invocations_routes_by_the_body(url):
    completion = {"model": "llama", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    direct = httpx.post(f"{url}/v1/completions", json=completion).json()
    routed = httpx.post(f"{url}/invocations", json=completion).json()
    assert routed["object"] == "text_completion" and routed["choices"][0]["text"] == direct["choices"][0]["text"]
    chat = {"model": "llama", "messages": CHAT, "max_tokens": 3, "temperature": 0}
    assert httpx.post(f"{url}/invocations", json=chat).json()["object"] == "chat.completion"
    embedding = httpx.post(f"{url}/invocations", json={"model": "bert", "input": "hi"}).json()
    assert embedding["object"] == "list" and len(embedding["data"][0]["embedding"]) > 0
    unknown = httpx.post(f"{url}/invocations", json={"model": "llama", "what": 1})
    assert unknown.status_code == 400 and "suitable handler" in unknown.json()["error"]["message"]
    bad = httpx.post(f"{url}/invocations", json={"model": "llama", "prompt": "x", "temperature": "hot"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "Bad Request"


def test_tokenizer_info_only_when_enabled(url, served):
    assert httpx.get(f"{url}/tokenizer_info").status_code == 404
    with background_server(served, ServerSettings(enable_tokenizer_info_endpoint=True)) as base:
        info = httpx.get(f"{base}/tokenizer_info", params={"model": "qwen"}).json()
        assert info["tokenizer_class"] and "chat_template" in info


def test_openapi_documents_the_statuses_sent(url):
    spec = httpx.get(f"{url}/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (path, method)
            if method == "post":
                error = operation["responses"]["400"]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "content" not in spec["paths"]["/health"]["get"]["responses"]["200"]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    completion = spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert completion["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionResponse"}
    event = completion["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert {"$ref": "#/components/schemas/CompletionStreamResponse"} in event[1]["contentSchema"]["anyOf"]
    assert "application/octet-stream" in spec["paths"]["/v1/embeddings"]["post"]["responses"]["200"]["content"]
    options = httpx.options(f"{url}/ping")
    assert options.status_code == 405 and options.headers["allow"] == "GET, POST"  # both routes of the path


def test_return_tokens_as_token_ids_by_default(served):
    with background_server(served, ServerSettings(return_tokens_as_token_ids=True)) as base:
        body = {"model": "llama", "prompt": "hi", "max_tokens": 2, "logprobs": 1}
        tokens = httpx.post(f"{base}/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
        assert tokens and all(t.startswith("token_id:") for t in tokens)
        plain = {**body, "return_tokens_as_token_ids": False}
        tokens = httpx.post(f"{base}/v1/completions", json=plain).json()["choices"][0]["logprobs"]["tokens"]
        assert not any(t.startswith("token_id:") for t in tokens)


def test_prompt_tokens_details_count_the_cached_tokens(served):
    with background_server(served, ServerSettings(enable_prompt_tokens_details=True)) as base:
        body = {"model": "qwen", "prompt": " ".join(["a cached prefix"] * 20), "max_tokens": 1}
        httpx.post(f"{base}/v1/completions", json=body)
        again = httpx.post(f"{base}/v1/completions", json=body).json()["usage"]
        assert again["prompt_tokens_details"]["cached_tokens"] >= 16
        stream = {"model": "qwen", "messages": CHAT, "max_tokens": 1, "stream": True,
                  "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=stream) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert "cached_tokens" in chunks[-1]["usage"]["prompt_tokens_details"]


def test_a_dead_engine_turns_health_to_503(tiny_models, llm_cache, monkeypatch):
    llm = llm_cache(tiny_models["tiny-mistral"], TINY_ENGINE)
    engine = AsyncEngine(llm.engine)
    model = ServedModel.from_engine(["mistral"], "tiny-mistral", engine, "auto")

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine, "core_step", broken_step)
    try:
        with background_server([model]) as base:
            assert httpx.get(f"{base}/health").status_code == 200
            failed = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
            assert failed.status_code == 500 and failed.json()["error"]["type"] == "InternalServerError"
            assert "device lost" not in failed.text
            assert httpx.get(f"{base}/health").status_code == 503
    finally:
        engine.shutdown()
        for request_id in list(llm.engine._requests):
            llm.engine.abort_request(request_id)


def test_a_request_template_that_fails_is_a_400(served):
    """With --trust-request-chat-template, a template that raises (as real ones do on bad role orders) or does not
    parse is the client's error, and the server keeps serving."""
    with background_server(served, ServerSettings(trust_request_chat_template=True)) as base:
        for template, fragment in (
            ("{{ raise_exception('Conversation roles must alternate') }}", "roles must alternate"),
            ("{% for message in messages %}", "Unexpected end of template"),
        ):
            body = {"model": "llama", "messages": CHAT, "max_tokens": 2, "chat_template": template}
            response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 400, response.text
            assert fragment in response.json()["error"]["message"]
            assert response.json()["error"]["type"] == "BadRequestError"
        custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        body = {"model": "llama", "messages": CHAT, "max_tokens": 2, "chat_template": custom}
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200
