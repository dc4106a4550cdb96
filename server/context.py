"""What a route handler knows about the request beyond its body: its ids, the metrics, the server settings."""

from __future__ import annotations

import dataclasses
import time
import uuid

from fastapi import Request

from .metrics import ServerMetrics
from .protocol import GenerationRequest, StreamOptions
from .settings import ServerSettings


def random_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclasses.dataclass
class RequestContext:
    response_id: str  # the `id` of the response, e.g. cmpl-<X-Request-Id or random>
    engine_id: str  # the engine's id for it, unique even when clients reuse X-Request-Id
    created: int
    metrics: ServerMetrics
    settings: ServerSettings

    @classmethod
    def of(cls, raw: Request, prefix: str, body_request_id: str | None = None) -> RequestContext:
        state = raw.app.state.server
        base = raw.headers.get("X-Request-Id") or body_request_id or random_id()
        response_id = f"{prefix}-{base}"
        return cls(
            response_id, f"{response_id}-{uuid.uuid4().hex[:8]}", int(time.time()), state.metrics, state.settings
        )

    def usage_options(self, options: StreamOptions | None) -> tuple[bool, bool]:
        """(include_usage, continuous_usage_stats) of a stream."""
        if self.settings.enable_force_include_usage:
            return True, True
        if options is None:
            return False, False
        return bool(options.include_usage), bool(options.include_usage and options.continuous_usage_stats)

    def cached_tokens(self, outputs_cached: dict[int, int]) -> int | None:
        """The prompt tokens the prefix cache served, summed over a request's prompts, when the server reports
        them (--enable-prompt-tokens-details)."""
        return sum(outputs_cached.values()) if self.settings.enable_prompt_tokens_details else None

    def tokens_as_ids(self, request: GenerationRequest) -> bool:
        """Whether logprob tokens read `token_id:N`: the request's `return_tokens_as_token_ids`, else the
        server's `--return-tokens-as-token-ids`."""
        if request.return_tokens_as_token_ids is not None:
            return request.return_tokens_as_token_ids
        return self.settings.return_tokens_as_token_ids
