"""Chat through diffbox.client and `diffbox chat`, on the session's chat worker (tests/chatworker.py:
the runpod SDK's local API server running handler.py's generator handler, a real vLLM on the
CPU with a tiny random-weight model: texts are compared with each other, never read).

The local server runs a /run job inside the one /stream request that asks for it: the chunks
arrive together at the end there, one by one on RunPod."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffbox.client import Client, NotSupported
from tests.chatworker import ChatWorker
from tests.conftest import REPO
from tests.e2e.test_chat import PLAIN

pytestmark = pytest.mark.timeout(400)


def test_stream_joins_to_the_plain_text(chat_worker: ChatWorker) -> None:
    plain = chat_worker.result(PLAIN)
    client = Client(chat_worker.api.url, poll_s=0.1)
    job = client.submit({**PLAIN, "stream": True})
    chunks = list(job.stream(timeout=120))
    assert len(chunks) > 5 and "".join(c["delta"] for c in chunks) == plain["text"]
    assert job.result() == plain  # the chunks, joined
    # Not streamed: the generator's one chunk is the result.
    assert client.run(PLAIN, timeout=120) == plain


def test_cli_chat_streams_the_text(chat_worker: ChatWorker) -> None:
    plain = chat_worker.result(PLAIN)
    argv = [sys.executable, "-m", "diffbox", "chat", PLAIN["messages"][0]["content"], "--max-tokens", "24",
            "--temperature", "0", "--seed", "7", "--endpoint", chat_worker.api.url, "--poll", "0.1"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=200)
    assert done.returncode == 0, done.stderr
    # Bytes: random weights write control characters that text mode would translate.
    assert done.stdout == (plain["text"] + "\n").encode()
    assert b"length, 24 tokens" in done.stderr


def test_cancel_is_refused_by_the_local_server(chat_worker: ChatWorker) -> None:
    job = Client(chat_worker.api.url).submit({**PLAIN, "max_tokens": 2})
    with pytest.raises(NotSupported, match="no /cancel"):
        job.cancel()
    assert job.result(timeout=120)["usage"]["completion_tokens"] == 2  # it ran to its end
