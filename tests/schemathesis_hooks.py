"""Loaded by schemathesis in `test_server_schema.py` (SCHEMATHESIS_HOOKS): a generated body that names no model,
or a random one, names a served model that can answer its route, so that valid bodies reach the engines instead
of stopping at a 404. A `model` of the wrong type is left alone: it keeps an invalid body invalid."""

from __future__ import annotations

import schemathesis

MODEL_FOR_ROUTE = {  # path prefix: served model name (tests/test_server_schema.py MODELS)
    "/v1/completions": "llama",
    "/v1/chat": "llama",
    "/tokenize": "llama",
    "/detokenize": "llama",
    "/invocations": "llama",
    "/v1/embeddings": "bert",
    "/v2/embed": "bert",
    "/pooling": "bert",
    "/classify": "classifier",
    "/score": "cross",
    "/v1/score": "cross",
    "/rerank": "cross",
    "/v1/rerank": "cross",
    "/v2/rerank": "cross",
}


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body):
    model = next((name for path, name in MODEL_FOR_ROUTE.items() if context.operation.path.startswith(path)), None)
    if model and isinstance(body, dict) and isinstance(body.get("model"), str | None):
        body["model"] = model
    return body
