"""Tests over several devices: 8 CPU devices forced at start-up (XLA_FLAGS, read when JAX first initializes its
backend, so these tests run in a pytest process of their own: `make test` gives them one)."""

import os

FORCED_DEVICES = 8

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={FORCED_DEVICES}"
    ).strip()
