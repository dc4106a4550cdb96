"""The OpenAI-compatible HTTP server (FastAPI). Never imports jax: it talks to the engine through
`jaxserve.async_engine.AsyncEngine`."""
