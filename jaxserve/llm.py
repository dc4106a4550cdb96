"""The offline API, as in vLLM: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from .config import EngineConfig
from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams
from .tokenizer import Tokenizer, load_chat_template

# a text, a list of token ids, or a dict {"prompt": text} / {"prompt_token_ids": ids}
PromptType = str | list[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    def __init__(self, model: str, **engine_args: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._request_ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in prompt order."""
        items = [self._tokenize(p) for p in _as_prompt_list(prompts)]
        return self._run(items, sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = load_chat_template(chat_template)
        tokenizer = self.engine.tokenizer
        items = []
        for conversation in conversations:
            text = tokenizer.render_chat(
                conversation,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=documents,
                chat_template_kwargs=chat_template_kwargs,
            )
            items.append((text, tokenizer.encode(text, add_special_tokens=False)))
        return self._run(items, sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self._tokenize(prompt["prompt"])
        return None, list(prompt)

    def _run(self, items, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = (
            [sampling_params] * len(items) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(items):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        for (_, ids), params in zip(items, params_list):
            self.engine.validate(ids, params)

        order = {}
        for (text, ids), params in zip(items, params_list):
            request_id = str(next(self._request_ids))
            order[request_id] = len(order)
            self.engine.add_request(request_id, ids, params.clone(output_kind=RequestOutputKind.FINAL_ONLY), text)
        results: list[RequestOutput | None] = [None] * len(items)
        with tqdm(total=len(items), desc="Generating", unit="prompt", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    results[order[output.request_id]] = output
                    bar.update()
        return results


def _as_prompt_list(prompts: PromptType | Seq[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("You must pass at least one prompt")
    if all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts
