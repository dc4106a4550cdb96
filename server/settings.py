"""The server's own settings (the HTTP side of `jaxserve serve`'s flags; engine flags go to the engines)."""

from __future__ import annotations

import dataclasses
from typing import Any

DEFAULT_MAX_REQUEST_BYTES = 32 << 20


@dataclasses.dataclass
class ServerSettings:
    api_keys: list[str] = dataclasses.field(default_factory=list)  # empty: no authentication
    api_key_all_routes: bool = False  # the key guards every route but the probes (else /v1, /v2 only, as vLLM)
    enable_request_id_headers: bool = False
    allowed_origins: list[str] = dataclasses.field(default_factory=list)
    allowed_methods: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    root_path: str | None = None
    max_num_queued_reqs: int | None = None  # requests waiting per engine before new ones get a 503
    max_n: int = 128  # most samples (or beams) per request
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens (prefix-cache hits)
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N" unless a request says otherwise
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_header_timeout: float | None = 30.0  # seconds to send a request's headers, else 408 (None: no limit)
    request_body_timeout: float | None = 60.0  # seconds to send its body once the headers are in, else 408
    response_role: str = "assistant"
    trust_request_chat_template: bool = False
    enable_auto_tool_choice: bool = False  # tool_choice "auto": the parser below finds the calls in the output
    tool_call_parser: str | None = None  # a name in tool_parsers.TOOL_PARSERS
    default_chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    enable_force_include_usage: bool = False
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info (it shows the chat template)
    max_stored_responses: int = 1000  # /v1/responses kept for previous_response_id; the oldest go first
    launched_at: float | None = None  # time.time() when the server was launched: start-up is measured from it
