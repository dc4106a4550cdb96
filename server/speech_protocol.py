"""Request and response bodies of `/v1/audio/transcriptions` and `/v1/audio/translations`, with vLLM's field names
and defaults (vllm/entrypoints/openai/speech_to_text/protocol.py) and OpenAI's response shapes.

The request is multipart/form-data, whose values all arrive as strings: unlike the JSON bodies (protocol.py, strict
types) its fields are read in pydantic's lax mode, so `"0.5"` is a temperature and `"true"` a boolean."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxserve.speech import Segment

from .protocol import ResponseBody, UsageInfo, now

AudioResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class SpeechRequest(BaseModel):
    """The form of both endpoints (vLLM's TranscriptionRequest; a translation reads the same fields). Unknown fields
    are accepted and ignored, as on the JSON routes."""

    model_config = ConfigDict(extra="allow")

    file: UploadFile
    model: str | None = None
    language: str | None = None  # ISO-639-1; none: detected (multilingual models), English (English-only ones)
    prompt: str = ""
    response_format: AudioResponseFormat = "json"
    temperature: float = 0.0
    timestamp_granularities: list[Literal["word", "segment"]] = Field([], alias="timestamp_granularities[]")
    stream: bool | None = False
    # stream_options, flattened for form data (vLLM's)
    stream_include_usage: bool | None = False
    stream_continuous_usage_stats: bool | None = False
    # vLLM's sampling extras; None takes the model's generation_config, then OpenAI's default
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    max_completion_tokens: int | None = None
    use_beam_search: bool = False
    to_language: str | None = None  # Whisper translates to English only: ignored
    vllm_xargs: dict[str, str | int | float | bool] | None = None  # custom extensions' arguments: none here

    @field_validator("vllm_xargs", mode="before")
    @classmethod
    def _xargs_from_json(cls, value: object) -> object:
        """Form data carries `vllm_xargs` as a JSON string."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"Failed to parse vllm_xargs. Must be valid JSON: {exc}") from None
        return value


class DurationUsage(ResponseBody):
    """A transcription's usage: the audio's length in seconds, rounded up (OpenAI's, vLLM's)."""

    type: Literal["duration"] = "duration"
    seconds: int


class TranscriptionResponse(ResponseBody):
    text: str
    usage: DurationUsage


class TranslationResponse(ResponseBody):
    text: str


class TranscriptionVerboseResponse(ResponseBody):
    task: Literal["transcribe"] = "transcribe"
    language: str  # the spoken language's name ("english")
    duration: float
    text: str
    segments: list[Segment]
    usage: DurationUsage


class TranslationVerboseResponse(ResponseBody):
    task: Literal["translate"] = "translate"
    language: Literal["english"] = "english"  # the translation's language, as OpenAI reports it
    duration: float
    text: str
    segments: list[Segment]


class SpeechDelta(ResponseBody):
    content: str


class SpeechStreamChoice(ResponseBody):
    delta: SpeechDelta
    finish_reason: str | None = None  # each audio chunk's last delta carries its own, as vLLM's stream does
    stop_reason: int | str | None = None


class TranscriptionStreamResponse(ResponseBody):
    id: str
    object: Literal["transcription.chunk"] = "transcription.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[SpeechStreamChoice]
    usage: UsageInfo | None = None


class TranslationStreamResponse(ResponseBody):
    id: str
    object: Literal["translation.chunk"] = "translation.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[SpeechStreamChoice]
    usage: UsageInfo | None = None
