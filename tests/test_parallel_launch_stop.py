"""A real `hf-adaptive launch` on CPU (accelerate -> 2 gloo workers, the tiny random-weights model), stopped by a
signal: the request in flight is answered, the report is written, and no process of the launch is left.

Guards against orphans: a launcher that runs accelerate in a session of its own without handling SIGTERM or
SIGINT dies alone while its workers keep serving ``/generate``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from helpers import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 300  # long enough (about a second on CPU) that the signal lands while the request runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _wait_ready(base: str, launcher: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert launcher.poll() is None, f"the launch exited early with {launcher.returncode}"
        try:
            if _get(f"{base}/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server never became ready")


def _leftovers(marker: str) -> list[str]:
    """Every live process whose command line names this test's model directory (the whole process table)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if marker in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(f"{p.info['pid']}: {cmdline[:120]}")
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_the_request_in_flight_and_leaves_no_process(tmp_path, sig):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_model("llama", seed=3).save_pretrained(model_dir)
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "hf_adaptive.cli", "launch", "--model", str(model_dir), "--gpus", "2", "--cpu",
           "--plan", "dp", "--dtype", "float32", "--http-port", str(port), "--out", str(tmp_path),
           "--drain-seconds", "60"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, launcher)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        assert len(tree) >= 3, [p.cmdline() for p in tree]  # accelerate's agent and two workers
        reply: dict = {}

        def call() -> None:
            body = json.dumps({"prompt_tokens": 8, "max_new_tokens": NEW_TOKENS}).encode()
            with urllib.request.urlopen(urllib.request.Request(f"{base}/generate", data=body), timeout=120) as r:
                reply.update(status=r.status, body=json.loads(r.read()))

        client = threading.Thread(target=call)
        client.start()
        deadline = time.monotonic() + 30
        while "hf_adaptive_http_in_flight 1.0" not in _get(f"{base}/metrics")[1]:
            assert time.monotonic() < deadline and client.is_alive(), "the request never got in flight"
            time.sleep(0.02)
        launcher.send_signal(sig)
        client.join(120)
        rc = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert reply.get("status") == 200 and len(reply["body"]["tokens"]) == NEW_TOKENS, reply
    assert rc == 0, f"the drained launch should exit cleanly, got {rc}"
    time.sleep(0.5)  # let the kernel reap
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert _leftovers(str(model_dir)) == []
    report = json.loads((tmp_path / "serve.json").read_text())
    assert [r["new_tokens"] for r in report["requests"]] == [NEW_TOKENS]
