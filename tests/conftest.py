"""Shared test set-up: no W&B network calls, and tiny configs for end-to-end runs."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch):
    # W&B is exercised offline by the tests that want it; everything else must not try to reach a server.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
