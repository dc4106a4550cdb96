"""Engine behaviour through the offline API on a tiny model: sampling options, stop conditions, logprobs,
n > 1, chat, streaming deltas and incremental detokenization."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve import RequestOutputKind, SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "Once upon a time in a small village by the sea"
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture
def llm(tiny_models, make_llm):
    return make_llm(tiny_models["tiny-qwen3"])


@pytest.fixture
def greedy(llm):
    return llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]


def run(llm, **params):
    return llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0].outputs


def test_top_k_1_is_greedy(llm, greedy):
    out = run(llm, temperature=1.0, top_k=1, max_tokens=24, ignore_eos=True, seed=3)[0]
    assert out.token_ids == greedy.token_ids


def test_seeds_repeat_and_differ(llm):
    params = dict(temperature=1.0, max_tokens=24, ignore_eos=True)
    first, again, other = (run(llm, seed=s, **params)[0].token_ids for s in (7, 7, 8))
    assert first == again
    assert first != other


def test_n_samples_are_distinct_and_reproducible(llm):
    outs = run(llm, n=3, temperature=1.0, max_tokens=16, ignore_eos=True, seed=11)
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) == 3
    assert [o.token_ids for o in run(llm, n=3, temperature=1.0, max_tokens=16, ignore_eos=True, seed=11)] == [
        o.token_ids for o in outs
    ]


def test_max_tokens_caps_the_output(llm, greedy):
    out = run(llm, temperature=0, max_tokens=5, ignore_eos=True)[0]
    assert out.token_ids == greedy.token_ids[:5] and out.finish_reason == "length" and out.stop_reason is None


def test_stop_string_cuts_the_text(llm, greedy):
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and stop in text
    out = run(llm, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = run(llm, temperature=0, max_tokens=24, ignore_eos=True, stop=stop, include_stop_str_in_output=True)[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_streamed_deltas_hold_back_a_possible_stop_string(llm, greedy):
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    final = text[: text.index(stop)]
    engine = llm.engine
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], output_kind=RequestOutputKind.DELTA
    )
    engine.add_request("stream", engine.tokenizer.encode(PROMPT), params)
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o.outputs[0] for o in engine.step()]
    streamed = ""
    for delta in deltas:
        streamed += delta.text
        assert final.startswith(streamed)  # nothing of the stop string (or past it) ever went out
    assert streamed == final
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == greedy.token_ids[: len(tokens)]
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])


def test_stop_token_ids_end_the_sequence(llm, greedy):
    stop_token = greedy.token_ids[5]
    first = greedy.token_ids.index(stop_token)
    out = run(llm, temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_token])[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token


def test_min_tokens_bans_stop_tokens(llm, greedy):
    stop_token = greedy.token_ids[0]
    out = run(llm, temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_token], min_tokens=6)[0]
    assert out.token_ids[0] != stop_token
    assert stop_token not in out.token_ids[:6]
    assert len(out.token_ids) >= 6


def test_eos_from_generation_config_and_ignore_eos(tiny_models, make_llm, greedy):
    eos = greedy.token_ids[3]
    first = greedy.token_ids.index(eos)
    llm = make_llm(tiny_models["tiny-qwen3"], override_generation_config={"eos_token_id": [2, eos]})
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == eos
    ignored = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == greedy.token_ids


def test_logprobs_match_hf(tiny_models, llm):
    folder = tiny_models["tiny-qwen3"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    output = llm.generate(PROMPT, params, use_tqdm=False)[0]
    out = output.outputs[0]
    ids = output.prompt_token_ids + out.token_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    n_prompt = len(output.prompt_token_ids)

    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == n_prompt
    for position, entry in enumerate(output.prompt_logprobs[1:], 1):
        row = expected[position - 1]
        assert entry[ids[position]].logprob == pytest.approx(row[ids[position]], abs=1e-4)
        assert entry[ids[position]].rank == 1 + int((row > row[ids[position]]).sum())
        top = np.argsort(-row)[:2]
        assert set(top) <= set(entry)
    cumulative = 0.0
    for step, entry in enumerate(out.logprobs):
        row, token = expected[n_prompt - 1 + step], out.token_ids[step]
        assert list(entry)[0] == token and entry[token].rank == 1
        assert [t for t in entry] == list(np.argsort(-row)[:3])
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(row[t], abs=1e-4)
            assert lp.decoded_token == llm.get_tokenizer().decode([t])
        cumulative += row[token]
    assert out.cumulative_logprob == pytest.approx(cumulative, abs=1e-3)


def test_chat_renders_the_template(llm):
    messages = [{"role": "user", "content": "Say something."}]
    rendered = llm.get_tokenizer().render_chat(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    direct = llm.generate(
        {"prompt_token_ids": llm.get_tokenizer().encode(rendered, add_special_tokens=False)}, GREEDY, use_tqdm=False
    )[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    assert chat.prompt == rendered


def test_default_sampling_params_come_from_generation_config(tiny_models, make_llm):
    defaults = make_llm(tiny_models["tiny-llama"]).get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.repetition_penalty) == (0.7, 0.9, 1.1)


def test_detokenizer_never_emits_half_a_character(llm):
    tokenizer = llm.get_tokenizer()
    text = "naïve café 日本語 🎉🙂 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = tokenizer.detokenizer([], skip_special_tokens=True)
    pieces = [detok.step(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text.split())  # some characters really were split across tokens


def test_bfloat16_weights_and_cache(tiny_models, make_llm, greedy):
    llm = make_llm(tiny_models["tiny-qwen3"], dtype="bfloat16")
    assert {str(p.dtype) for p in llm.engine.runner.state.kv_pages} == {"bfloat16"}
    out = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 24
    assert out.token_ids[:3] == greedy.token_ids[:3]  # bf16 drifts from float32, but not at once


def test_dummy_load_format_uses_random_weights(tiny_models, make_llm, greedy):
    llm = make_llm(tiny_models["tiny-qwen3"], load_format="dummy")
    out = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 24 and out.token_ids != greedy.token_ids


def test_max_logprobs_minus_one_returns_the_whole_vocabulary(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"], max_logprobs=-1, max_num_batched_tokens=16)
    vocab = llm.engine.vocab_size
    params = GREEDY.clone(max_tokens=2, logprobs=-1, prompt_logprobs=-1)
    output = llm.generate("a b c", params, use_tqdm=False)[0]
    assert all(len(entry) == vocab for entry in output.outputs[0].logprobs)
    assert all(len(entry) == vocab for entry in output.prompt_logprobs[1:])
