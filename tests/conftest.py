"""Fixtures shared by the test files."""

import os
import threading

# No test reaches the real Hub: without the stand-in (the `hub` fixture), huggingface_hub reads
# its cache only. Set before anything imports huggingface_hub, and inherited by subprocesses.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

import data
from hub_server import HubServer, point_huggingface_hub_at
from test_train import SEQ, TINY, VOCAB


def tiny_files(directory):
    """A config file (test_train.TINY) for a tiny model on random tokens in directory; returns
    (config path, runs dir)."""
    rows = np.random.default_rng(0).integers(0, VOCAB, size=(4096, SEQ + 1))
    data.write_shards(rows, directory / "shards")
    runs = directory / "runs"
    config = directory / "tiny.py"
    config.write_text(TINY.format(data=str(directory / "shards"), runs=str(runs)))
    return config, runs


@pytest.fixture
def tiny(tmp_path):
    return tiny_files(tmp_path)


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
