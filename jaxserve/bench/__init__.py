"""Throughput and latency benchmarks; `serve` drives an already-running OpenAI-compatible server over HTTP."""
