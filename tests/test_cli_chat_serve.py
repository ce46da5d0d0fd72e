"""The `hetero-rt chat` and `hetero-rt serve` commands end to end: chat reads turns from stdin and
streams replies equal to generate()'s; serve, started as a real process, answers the openai client
and /health, and exits cleanly on Ctrl-C (SIGINT)."""
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import json

import openai
import pytest

import hetero_rt
from hetero_rt.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")


def test_chat_command_streams_each_turn(tiny, monkeypatch, capsys):
    rt = hetero_rt.load(tiny, dtype="float32")
    one = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hello"}]
    first = rt.generate(one, max_new_tokens=6).text
    two = one + [{"role": "assistant", "content": first}, {"role": "user", "content": "again"}]
    second = rt.generate(two, max_new_tokens=6).text
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n/exit\n"))
    code = cli_main(["chat", "--model", str(tiny), "--dtype", "float32", "-n", "6", "--system", "terse"])
    out, err = capsys.readouterr()
    assert code == 0
    assert first in out and second in out and out.index(first) < out.index(second)
    assert err.count("tok/s") >= 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_and_stops_on_ctrl_c(tiny):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hetero_rt.cli", "serve", "--model", str(tiny), "--dtype",
                             "float32", "--port", str(port), "--parallel", "2", "--context", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 300          # a bound on start-up (a cold numba cache compiles), not a timing
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    status, health = r.status, json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert status == 200 and health["status"] == "ok"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        models = [m.id for m in client.models.list().data]
        assert models == ["ckpt"]
        msgs = [{"role": "user", "content": "hello"}]
        reply = client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=5, temperature=0)
        want = hetero_rt.load(tiny, dtype="float32").generate(msgs, max_new_tokens=5)
        assert reply.choices[0].message.content == want.text
        assert reply.usage.completion_tokens == len(want.new_ids)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode in (0, 130), out
    assert "Traceback" not in out, out
