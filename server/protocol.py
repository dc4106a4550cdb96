"""Request and response bodies of the generation and utility routes, with vLLM's field names and defaults
(docs/architecture.md §8; docs/server.md). Unknown request fields are accepted and ignored, as vLLM
does with fields it has dropped (`best_of`); the older `guided_*` fields still constrain the output."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

MAX_STOP_STRINGS = 4


class RequestBody(BaseModel):
    """Strict types, as the API documents them: `"5"` is not an integer nor `1` a boolean (a 400, where pydantic's
    lax mode would coerce them); integers are accepted where numbers are."""

    model_config = ConfigDict(extra="allow", strict=True)


class ResponseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests -----------------------------------------------------------------------------------------------

# What `/openapi.json` says of prompts and messages, beyond their types: not empty, and a message has a role. Only
# documented: the handlers check these, with vLLM's messages.
PromptInput = Annotated[
    str | list[str] | list[int] | list[list[int]],
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                {"type": "array", "minItems": 1, "items": {"type": "array", "items": {"type": "integer"}}},
            ]
        }
    ),
]
MESSAGE_SCHEMA = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string"},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "object"}]}},  # parts
                {"type": "null"},
            ]
        },
    },
}
ChatMessages = Annotated[
    list[dict[str, Any]], WithJsonSchema({"type": "array", "minItems": 1, "items": MESSAGE_SCHEMA})
]


class StructuredOutputs(RequestBody):
    """vLLM's `structured_outputs`: one constraint (json, regex, choice, grammar, json_object, structural_tag) and
    the options for JSON."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class JsonSchemaFormat(RequestBody):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    """OpenAI's `response_format`: text, json_object, json_schema (`json_schema.schema`), or vLLM's structural_tag
    (`structures` and `triggers`, kept as extra fields)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(RequestBody):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class GenerationRequest(RequestBody):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None  # the older guided_* spellings of structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    request_id: str | None = None
    priority: int = 0
    cache_salt: str | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        return stop


class CompletionRequest(GenerationRequest):
    prompt: PromptInput
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True


class ChatTemplateFields(RequestBody):
    """What the chat template is rendered from (shared by chat completions and /tokenize)."""

    messages: ChatMessages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class ChatCompletionRequest(ChatTemplateFields, GenerationRequest):
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"minItems": 1})  # empty: 400 (/tokenize: ok)
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    reasoning_effort: str | None = None
    include_reasoning: bool = True  # with --reasoning-parser: send the thinking in `reasoning`
    echo: bool = False


class TokenizeCompletionRequest(RequestBody):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatTemplateFields):
    model: str | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int] = Field(..., min_length=0)

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, tokens: list[int]) -> list[int]:
        if any(t < 0 for t in tokens):
            raise ValueError("token ids must be non-negative")
        return tokens


# --- responses ----------------------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class UsageInfo(ResponseBody):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = None


class CompletionLogProbs(ResponseBody):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(ResponseBody):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionStreamResponse(ResponseBody):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


class CompletionResponse(CompletionStreamResponse):
    service_tier: str | None = None
    kv_transfer_params: dict[str, Any] | None = None


class ChatLogProb(ResponseBody):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(ResponseBody):
    content: list[ChatLogProbsContent] | None = None


class FunctionCallBody(ResponseBody):
    name: str
    arguments: str  # a JSON object


class ToolCall(ResponseBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallBody


class DeltaFunctionCall(ResponseBody):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(ResponseBody):
    """A streamed piece of a tool call: its index, id, type and name first, then fragments of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatMessage(ResponseBody):
    role: str
    content: str | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    reasoning: str | None = None


class ChatChoiceOutcome(ResponseBody):
    """What a chat choice carries besides its message or delta."""

    index: int
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChoice(ChatChoiceOutcome):
    message: ChatMessage


class DeltaMessage(ResponseBody):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(ChatChoiceOutcome):
    delta: DeltaMessage


class ChatCompletionStreamResponse(ResponseBody):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None


class ChatCompletionResponse(ResponseBody):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict[str, Any] | None = None


class TokenizeResponse(ResponseBody):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(ResponseBody):
    prompt: str


class ModelPermission(ResponseBody):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(ResponseBody):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "jaxserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(ResponseBody):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
