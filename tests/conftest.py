"""Fixtures shared by the test files."""

import threading

import pytest

from hub_server import HubServer, point_huggingface_hub_at


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local stand-in for the Hub (tests/hub_server.py), with huggingface_hub pointed at it and
    at an empty cache, tmp_path / "hf-cache". Add repos with hub.add_repo(repo_id, directory)."""
    with HubServer() as server:
        point_huggingface_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
        yield server
        for thread in threading.enumerate():  # downloads a test started ahead of its reader
            if thread.name.startswith("prefetch "):
                thread.join(timeout=10)
