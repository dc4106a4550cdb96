"""Request and response bodies of the pooling routes (docs/architecture.md §8): /v1/embeddings, /pooling,
/classify, /score and /rerank. Older spellings are accepted: `normalize` beside `use_activation`,
`text_1`/`text_2` beside `queries`/`documents`, a per-request `task` on /pooling."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .protocol import ChatMessages, PromptInput, RequestBody, ResponseBody, UsageInfo, now


class PoolingInputFields(RequestBody):
    """Completion-style `input`, or chat-style `messages` (one conversation, or a list of them)."""

    model: str | None = None
    input: PromptInput | None = None
    messages: ChatMessages | list[ChatMessages] | None = None
    add_special_tokens: bool | None = None  # default: true for `input`, false for `messages` (as vLLM)
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    use_activation: bool | None = None
    normalize: bool | None = None  # older spelling of use_activation for embeddings
    user: str | None = None
    request_id: str | None = None
    priority: int = 0

    @model_validator(mode="after")
    def _one_kind_of_input(self) -> PoolingInputFields:
        if (self.input is None) == (self.messages is None):
            raise ValueError("Exactly one of `input` and `messages` must be given")
        return self

    @property
    def activation(self) -> bool | None:
        return self.use_activation if self.use_activation is not None else self.normalize


class EncodingFields(RequestBody):
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"


class EmbeddingRequest(PoolingInputFields, EncodingFields):
    dimensions: int | None = None


class PoolingRequest(PoolingInputFields, EncodingFields):
    task: str | None = None
    dimensions: int | None = None


class ClassificationRequest(PoolingInputFields):
    pass


class ScoringFields(RequestBody):
    model: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    use_activation: bool | None = None
    activation: bool | None = None  # older spelling
    max_tokens_per_doc: int | None = None
    max_tokens_per_query: int | None = None
    instruction: str | None = None  # a score template's instruction (Qwen3-Reranker's <Instruct>)
    user: str | None = None
    request_id: str | None = None
    priority: int = 0

    @property
    def activate(self) -> bool | None:
        return self.use_activation if self.use_activation is not None else self.activation


ScoreInput = str | list[str]
PAIR_SPELLINGS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoreRequest(ScoringFields):
    queries: ScoreInput | None = None
    documents: ScoreInput | None = None
    items: ScoreInput | None = None
    data_1: ScoreInput | None = None
    data_2: ScoreInput | None = None
    text_1: ScoreInput | None = None
    text_2: ScoreInput | None = None

    def sides(self) -> tuple[ScoreInput, ScoreInput]:
        """The two sides, whichever of vLLM's spellings the request used (exactly one)."""
        given = [(a, b) for a, b in PAIR_SPELLINGS if getattr(self, a) is not None and getattr(self, b) is not None]
        if len(given) != 1:
            spellings = ", ".join(f"{a}+{b}" for a, b in PAIR_SPELLINGS)
            raise ValueError(f"Give exactly one pair of inputs: {spellings}")
        first, second = given[0]
        return getattr(self, first), getattr(self, second)


class RerankRequest(ScoringFields):
    query: str
    documents: list[str | dict[str, Any]]
    top_n: int = Field(0, ge=0)
    return_documents: bool = True


class EmbeddingData(ResponseBody):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | list[list[float]] | str


class PoolingData(ResponseBody):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | list[list[float]] | str


class ClassificationData(ResponseBody):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ScoreData(ResponseBody):
    index: int
    object: Literal["score"] = "score"
    score: float


class ListResponse(ResponseBody):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[EmbeddingData] | list[PoolingData] | list[ClassificationData] | list[ScoreData]
    usage: UsageInfo


class RerankDocument(ResponseBody):
    text: str
    multi_modal: Any = None


class RerankResult(ResponseBody):
    index: int
    document: RerankDocument | None = None
    relevance_score: float


class RerankUsage(ResponseBody):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(ResponseBody):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


# --- Cohere's /v2/embed ---------------------------------------------------------------------------------------


class CohereEmbedContent(RequestBody):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict[str, str] | None = None


class CohereEmbedInput(RequestBody):
    content: list[CohereEmbedContent]


class CohereEmbedRequest(RequestBody):
    """Exactly one of `texts`, `images` (refused: the models read text) and `inputs` (content parts, embedded as a
    one-message chat). `input_type` selects a prompt prefix the model defines; `truncate` END keeps the first
    `max_tokens` tokens (default: the context), START the last, NONE refuses longer inputs."""

    model: str | None = None
    input_type: str | None = None
    texts: list[str] | None = None
    images: list[str] | None = None
    inputs: list[CohereEmbedInput] | None = None
    output_dimension: int | None = None
    embedding_types: list[Literal["float", "binary", "ubinary", "base64"]] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    max_tokens: int | None = Field(None, ge=1)
    priority: int = 0
    request_id: str | None = None


class CohereEmbeddings(ResponseBody):
    """The embeddings in each type asked for: floats, sign bits packed eight to a byte (`binary` as int8 values,
    `ubinary` as uint8), or base64 of little-endian float32."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    float_: list[list[float]] | None = Field(None, alias="float")
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereApiVersion(ResponseBody):
    version: str = "2"


class CohereTokens(ResponseBody):
    input_tokens: int


class CohereMeta(ResponseBody):
    api_version: CohereApiVersion = Field(default_factory=CohereApiVersion)
    tokens: CohereTokens  # vLLM's name
    billed_units: CohereTokens  # Cohere's name for the same count


class CohereEmbedResponse(ResponseBody):
    id: str
    embeddings: CohereEmbeddings
    texts: list[str] | None = None  # the texts embedded, when given as `texts`
    meta: CohereMeta
