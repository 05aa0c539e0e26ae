"""SpecPCClient against local servers only (127.0.0.1): a minimal completions server written here that records exactly
what it received, and (slow) a real `transformers serve` process on a tiny model saved to tmp_path.

The oracle for what must be sent is SpecPC run directly: `input_ids[0, kept_indices[0]]`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from hf_specapprox import (
    ServingError,
    SpecPCClient,
    SpecPCCompletion,
    SpecPCConfig,
    SpecPCPreprocessor,
    SpecPCStream,
    SpecPrefillPreprocessor,
)
from hf_specapprox.prompt.baselines import generate_advances_position_ids
from hf_specapprox.testing import tiny_pair, tiny_tokenizer, words

ROOT = Path(__file__).resolve().parents[1]
CONFIG = SpecPCConfig(max_capacity_prompt=96, window_size=16, kernel_size=7, lookahead_tokens=4, starting_layer_index=1)
CANNED = "w5 w6 w7"
CHUNKS = ["w5", " w6", " w7", " w8"]


# ----- a minimal completions server -----

class FakeCompletions:
    """A `/v1/completions` server on 127.0.0.1 (port 0) that records each request's JSON and answers per `mode`."""

    def __init__(self, mode="ok", sleep=0.0):
        self.mode, self.sleep = mode, sleep
        self.requests: list[dict] = []
        self.release = threading.Event()  # ends a sleeping handler at teardown
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "json": body, "headers": dict(self.headers)})
                fake.answer(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def send_json(self, handler, status, payload):
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def raw(self, handler, status, payload: bytes, content_type="application/json", length=None):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload) if length is None else length))
        handler.end_headers()
        handler.wfile.write(payload)

    def hostile(self, handler, mode) -> bool:
        """Answers of a misbehaving server (issue 27, items 7, 9, 10, 11 and 15); False for the other modes."""
        event = lambda text: f"data: {text}\n\n".encode()
        if mode == "choices_dict":
            self.raw(handler, 200, json.dumps({"choices": {"text": "x"}}).encode())
        elif mode == "choices_int":
            self.raw(handler, 200, json.dumps({"choices": 7}).encode())
        elif mode == "deep_json":
            self.raw(handler, 200, b"[" * 200_000 + b"]" * 200_000)
        elif mode == "big_int":
            self.raw(handler, 200, b'{"choices": [{"text": "x"}], "usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}")
        elif mode == "huge_length":
            self.raw(handler, 200, b'{"choices": []}', length=10**12)
        elif mode == "huge_body":
            self.raw(handler, 200, b'{"choices": [{"text": "' + b"x" * (60 << 20) + b'"}]}')
        elif mode == "redirect":
            handler.send_response(302)
            handler.send_header("Location", self.redirect_to)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif mode in ("trickle", "keepalive", "huge_line", "stream_bad_utf8", "stream_choices_dict", "stream_deep"):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json" if mode == "trickle" else "text/event-stream")
            handler.end_headers()
            handler.wfile.write(event(json.dumps({"choices": [{"text": "w5", "index": 0}]})))
            handler.wfile.flush()
            for _ in range(200 if mode in ("trickle", "keepalive") else 1):
                if self.release.is_set():
                    break
                if mode == "trickle":
                    handler.wfile.write(b" ")  # one byte, never a whole line or answer
                elif mode == "keepalive":
                    handler.wfile.write(b": keep-alive\n\n")
                elif mode == "huge_line":
                    handler.wfile.write(b"data: " + b"x" * (60 << 20))
                elif mode == "stream_bad_utf8":
                    handler.wfile.write(b"data: \xff\xfe\n\n")
                elif mode == "stream_choices_dict":
                    handler.wfile.write(event(json.dumps({"choices": {"text": "x"}})))
                else:
                    handler.wfile.write(b"data: " + b"[" * 200_000 + b"]" * 200_000 + b"\n\n")
                handler.wfile.flush()
                time.sleep(0.3 if mode in ("trickle", "keepalive") else 0)
        else:
            return False
        return True

    def answer(self, handler, body):
        mode, prompt = self.mode, body["prompt"]
        if self.hostile(handler, mode):
            return
        if mode == "sleep":
            self.release.wait(self.sleep)
        if mode == "status500":
            return self.send_json(handler, 500, {"error": {"message": "CUDA out of memory", "code": 500}})
        if mode == "status400" or (mode == "strings_only" and not isinstance(prompt, str)):
            return self.send_json(handler, 400, {"detail": "prompt must be a string."})
        if mode == "not_json":
            handler.send_response(200)
            handler.send_header("Content-Type", "text/html")
            handler.end_headers()
            handler.wfile.write(b"<html>hello</html>")
            return
        usage = {"prompt_tokens": len(prompt) if isinstance(prompt, list) else len(prompt.split()),
                 "completion_tokens": 3, "total_tokens": 0}
        if not body.get("stream"):
            return self.send_json(handler, 200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                                 "choices": [{"text": CANNED, "index": 0, "finish_reason": "length"}],
                                                 "usage": usage})
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        for number, chunk in enumerate(CHUNKS):
            event = {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": chunk, "index": 0}]}
            handler.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            handler.wfile.flush()
            if number == 0 and mode == "stream_error":
                handler.wfile.write(b'data: {"error": "RuntimeError: the model crashed"}\n\n')
                return
            if number == 0 and mode == "stream_cut":
                return  # the connection closes: no finish_reason, no [DONE]
            if number == 0 and mode == "stream_stall":
                self.release.wait(self.sleep)
                return
            time.sleep(0.01)
        handler.wfile.write(b": a comment line\n\n")
        handler.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        handler.wfile.write(b"data: [DONE]\n\n")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def free_port() -> int:
    """A port with nothing listening on it (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- fixtures and the oracle -----

@pytest.fixture(scope="module")
def setup():
    target, draft = tiny_pair()
    tokenizer = tiny_tokenizer()
    prompt = words(300, seed=5)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    oracle = SpecPCPreprocessor(draft, CONFIG)(input_ids, torch.ones_like(input_ids))
    kept_ids = input_ids[0, oracle.kept_indices[0]].tolist()
    assert 0 < len(kept_ids) < input_ids.shape[1]  # it compresses
    return dict(draft=draft, tokenizer=tokenizer, prompt=prompt, input_ids=input_ids, kept_ids=kept_ids)


def client_for(setup, server_or_url, **kwargs):
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url
    kwargs.setdefault("tokenizer", setup["tokenizer"])
    return SpecPCClient(SpecPCPreprocessor(setup["draft"], CONFIG), url, "tiny-model", **kwargs)


# ----- the token-id path -----

@pytest.mark.parametrize("prompt_format", ["ids", "auto"])
def test_sends_exactly_specpc_kept_ids_and_returns_the_stats(setup, prompt_format):
    with FakeCompletions() as server:
        result = client_for(setup, server, prompt_format=prompt_format).complete(
            setup["prompt"], max_tokens=7, temperature=0.0, seed=3)
    assert len(server.requests) == 1
    request = server.requests[0]
    assert request["path"] == "/v1/completions"
    assert request["json"] == {"model": "tiny-model", "prompt": setup["kept_ids"], "max_tokens": 7,
                               "temperature": 0.0, "seed": 3, "stream": False}
    assert isinstance(result, SpecPCCompletion)
    assert result.text == CANNED and result.response["choices"][0]["text"] == CANNED
    assert result.sent_prompt == setup["kept_ids"]
    stats = result.stats
    assert stats["original_tokens"] == 300 and stats["kept_tokens"] == len(setup["kept_ids"])
    assert stats["compression_ratio"] == pytest.approx(len(setup["kept_ids"]) / 300)
    assert stats["prompt_format"] == "ids" and stats["sent_tokens"] == len(setup["kept_ids"])
    assert stats["server_prompt_tokens"] == len(setup["kept_ids"])  # the server's own count
    assert stats["completion_tokens"] == 3 and stats["text_fallback_reason"] is None
    assert stats["compress_seconds"] > 0 and stats["request_seconds"] > 0 and stats["draft_seconds"] > 0
    json.dumps(stats)  # plain numbers


@pytest.mark.parametrize("as_", ["list", "tensor1d", "tensor2d"])
def test_token_id_prompts_give_the_same_request(setup, as_):
    ids = setup["input_ids"]
    prompt = {"list": ids[0].tolist(), "tensor1d": ids[0], "tensor2d": ids}[as_]
    with FakeCompletions() as server:
        client_for(setup, server, tokenizer=None, prompt_format="ids").complete(prompt, max_tokens=2)
    assert server.requests[0]["json"]["prompt"] == setup["kept_ids"]


def test_streaming_passes_the_chunks_through_in_order(setup):
    with FakeCompletions() as server:
        stream = client_for(setup, server, prompt_format="ids").complete(setup["prompt"], max_tokens=4, stream=True)
        assert isinstance(stream, SpecPCStream)
        assert stream.compressed.kept_lengths.tolist() == [len(setup["kept_ids"])]  # before any chunk
        with pytest.raises(RuntimeError, match="still open"):
            stream.result
        chunks = list(stream)
    assert chunks == CHUNKS
    assert server.requests[0]["json"]["prompt"] == setup["kept_ids"] and server.requests[0]["json"]["stream"] is True
    result = stream.result
    assert result.text == "".join(CHUNKS)
    assert [event["choices"][0]["text"] for event in result.response if event["choices"]] == CHUNKS
    assert result.stats["stream_complete"] is True
    assert result.stats["server_prompt_tokens"] == len(setup["kept_ids"])
    assert 0 < result.stats["first_chunk_seconds"] <= result.stats["request_seconds"]
    assert list(stream) == []  # exhausted


def test_closing_a_stream_early_keeps_what_came(setup):
    with FakeCompletions() as server:
        with client_for(setup, server, prompt_format="ids").complete(setup["prompt"], max_tokens=4,
                                                                     stream=True) as stream:
            first = next(stream)
    assert first == CHUNKS[0]
    assert stream.result.text == CHUNKS[0] and stream.result.stats["stream_complete"] is False


# ----- the text path and the "auto" fallback -----

def test_auto_falls_back_to_text_once_when_ids_are_refused(setup):
    tokenizer = setup["tokenizer"]
    with FakeCompletions(mode="strings_only") as server:
        client = client_for(setup, server)  # prompt_format="auto"
        first = client.complete(setup["prompt"], max_tokens=3)
        second = client.complete(setup["prompt"], max_tokens=3)
    prompts = [request["json"]["prompt"] for request in server.requests]
    assert prompts[0] == setup["kept_ids"]  # ids first
    assert len(prompts) == 3 and prompts[1] == prompts[2]  # then text, and text only from then on
    assert tokenizer(prompts[1])["input_ids"] == setup["kept_ids"]  # the text is the kept tokens
    assert first.text == second.text == CANNED
    for result in (first, second):
        assert result.stats["prompt_format"] == "text" and result.sent_prompt == prompts[1]
        assert "prompt must be a string" in result.stats["text_fallback_reason"]
        assert result.stats["text_roundtrip_exact"] is True
        assert result.stats["sent_tokens"] == len(setup["kept_ids"])


def test_text_format_sends_the_decoded_kept_tokens(setup):
    with FakeCompletions() as server:
        result = client_for(setup, server, prompt_format="text").complete(setup["prompt"], max_tokens=3)
    sent = server.requests[0]["json"]["prompt"]
    assert sent == " ".join(setup["tokenizer"].convert_ids_to_tokens(setup["kept_ids"]))
    assert result.stats["prompt_format"] == "text" and result.stats["text_fallback_reason"] is None


# ----- failures: a clear error, nothing lost -----

def assert_nothing_lost(error: ServingError, setup, sent="ids"):
    result = error.result
    assert isinstance(result, SpecPCCompletion)
    assert result.compressed.kept_lengths.tolist() == [len(setup["kept_ids"])]
    assert result.compressed.input_ids[0].tolist() == setup["kept_ids"]
    if sent == "ids":
        assert result.sent_prompt == setup["kept_ids"]
    assert result.stats["kept_tokens"] == len(setup["kept_ids"]) and result.stats["compress_seconds"] > 0
    assert "nothing was lost" in str(error)


def test_server_down(setup):
    client = client_for(setup, f"http://127.0.0.1:{free_port()}/v1", timeout=5)
    with pytest.raises(ServingError, match="connection refused") as caught:
        client.complete(setup["prompt"], max_tokens=3)
    assert isinstance(caught.value, RuntimeError) and caught.value.status is None
    assert caught.value.result.text is None
    assert_nothing_lost(caught.value, setup)


def test_server_too_slow(setup):
    with FakeCompletions(mode="sleep", sleep=10) as server:
        client = client_for(setup, server, timeout=0.5)
        start = time.perf_counter()
        with pytest.raises(ServingError, match=r"did not answer within the timeout \(0.5 s\).*raise `timeout=`") as caught:
            client.complete(setup["prompt"], max_tokens=3)
        assert time.perf_counter() - start < 5
    assert_nothing_lost(caught.value, setup)
    assert 0.4 < caught.value.result.stats["request_seconds"] < 5


def test_http_500(setup):
    with FakeCompletions(mode="status500") as server:
        with pytest.raises(ServingError, match="HTTP 500.*CUDA out of memory.*check its log") as caught:
            client_for(setup, server).complete(setup["prompt"], max_tokens=3)
    assert caught.value.status == 500 and "CUDA out of memory" in caught.value.body
    assert len(server.requests) == 1  # a server error is not retried as text
    assert_nothing_lost(caught.value, setup)


def test_http_400_with_ids_says_to_send_text(setup):
    with FakeCompletions(mode="status400") as server:
        with pytest.raises(ServingError, match="HTTP 400.*prompt must be a string.*prompt_format='text'") as caught:
            client_for(setup, server, prompt_format="ids").complete(setup["prompt"], max_tokens=3)
    assert caught.value.status == 400 and len(server.requests) == 1
    assert_nothing_lost(caught.value, setup)


def test_auto_reports_both_refusals(setup):
    with FakeCompletions(mode="status400") as server:
        client = client_for(setup, server)
        with pytest.raises(ServingError, match="refused the token ids .* and then the text prompt too") as caught:
            client.complete(setup["prompt"], max_tokens=3)
        with pytest.raises(ServingError):
            client.complete(setup["prompt"], max_tokens=3)
    prompts = [request["json"]["prompt"] for request in server.requests]
    assert prompts[0] == setup["kept_ids"] and isinstance(prompts[1], str)
    assert prompts[2] == setup["kept_ids"]  # the failed fallback taught the client nothing
    assert_nothing_lost(caught.value, setup, sent="text")


def test_answer_that_is_not_json(setup):
    with FakeCompletions(mode="not_json") as server:
        with pytest.raises(ServingError, match="not JSON.*Check `base_url`") as caught:
            client_for(setup, server).complete(setup["prompt"], max_tokens=3)
    assert_nothing_lost(caught.value, setup)


def test_stream_error_event_keeps_the_text_so_far(setup):
    with FakeCompletions(mode="stream_error") as server:
        stream = client_for(setup, server).complete(setup["prompt"], max_tokens=4, stream=True)
        received = []
        with pytest.raises(ServingError, match="in the middle of the stream: RuntimeError: the model crashed") as caught:
            for chunk in stream:
                received.append(chunk)
    assert received == CHUNKS[:1] and caught.value.result.text == CHUNKS[0]
    assert caught.value.result.stats["stream_complete"] is False
    assert_nothing_lost(caught.value, setup)


def test_stream_cut_short_is_an_error(setup):
    with FakeCompletions(mode="stream_cut") as server:
        stream = client_for(setup, server).complete(setup["prompt"], max_tokens=4, stream=True)
        with pytest.raises(ServingError, match="ended before the server said the answer was finished") as caught:
            list(stream)
    assert caught.value.result.text == CHUNKS[0] and caught.value.result.stats["stream_complete"] is False
    assert_nothing_lost(caught.value, setup)


def test_stream_that_stalls_times_out(setup):
    with FakeCompletions(mode="stream_stall", sleep=10) as server:
        stream = client_for(setup, server, timeout=0.5).complete(setup["prompt"], max_tokens=4, stream=True)
        with pytest.raises(ServingError, match="stopped sending in the middle of the stream") as caught:
            list(stream)
    assert caught.value.result.text == CHUNKS[0]
    assert_nothing_lost(caught.value, setup)


def test_refusals_before_any_work(setup):
    draft, tokenizer = setup["draft"], setup["tokenizer"]
    specpc = SpecPCPreprocessor(draft, CONFIG)
    url = "http://127.0.0.1:9/v1"
    with pytest.raises(ValueError, match="prompt_format"):
        SpecPCClient(specpc, url, "m", prompt_format="tokens")
    with pytest.raises(ValueError, match="base_url"):
        SpecPCClient(specpc, "127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="timeout"):
        SpecPCClient(specpc, url, "m", timeout=0)
    with pytest.raises(ValueError, match="tokenizer"):
        SpecPCClient(specpc, url, "m", prompt_format="text")
    with pytest.raises(TypeError, match="SpecPCPreprocessor"):
        SpecPCClient(draft, url, "m")
    client = SpecPCClient(specpc, url, "m")
    with pytest.raises(ValueError, match="string prompt needs `tokenizer=`"):
        client.complete("w3 w4", max_tokens=2)
    with pytest.raises(ValueError, match="One prompt per request"):
        client.complete(torch.ones(2, 5, dtype=torch.long), max_tokens=2)
    with pytest.raises(ValueError, match="set by the client"):
        client.complete([3, 4], max_tokens=2, model="x")
    with pytest.raises(ValueError, match="max_tokens"):
        client.complete([3, 4], max_tokens=0)
    with pytest.raises(TypeError, match="JSON values"):
        client.complete([3, 4], max_tokens=2, stop={1, 2})
    if generate_advances_position_ids():  # SpecPrefill with original positions exists (5.x)
        with pytest.raises(ValueError, match="original positions"):
            SpecPCClient(SpecPrefillPreprocessor(draft, max_capacity_prompt=96), url, "m")
    SpecPCClient(SpecPrefillPreprocessor(draft, max_capacity_prompt=96, keep_original_positions=False), url, "m")
    assert SpecPCClient(SpecPCPreprocessor(draft, CONFIG, tokenizer=tokenizer), url, "m").tokenizer is tokenizer


def test_api_key_and_headers_are_sent(setup):
    with FakeCompletions() as server:
        client_for(setup, server, api_key="sk-local", headers={"X-Trace": "7"}).complete([3, 4, 5], max_tokens=2)
    headers = server.requests[0]["headers"]
    assert headers["Authorization"] == "Bearer sk-local" and headers["X-Trace"] == "7"


@pytest.mark.slow  # a fresh interpreter: the floor and newest envs
def test_importing_loads_no_serving_package():
    code = ("import sys, hf_specapprox.integrations.serving; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'openai', 'starlette') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# ----- the example -----

def load_example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location("specpc_server", ROOT / "examples" / "specpc_server.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return module


def test_example_without_a_server_prints_the_error_and_the_stats(capsys):
    result = load_example().main(["--base-url", f"http://127.0.0.1:{free_port()}/v1", "--timeout", "5"])
    out = capsys.readouterr().out
    assert "connection refused" in out and "kept_tokens" in out
    assert result.text is None and result.stats["kept_tokens"] < result.stats["original_tokens"]


def test_example_against_a_server(capsys):
    with FakeCompletions() as server:
        result = load_example().main(["--base-url", server.base_url, "--prompt-format", "ids"])
    assert server.requests[0]["json"]["prompt"] == result.sent_prompt
    assert result.text == CANNED and CANNED in capsys.readouterr().out


# ----- the text path against a real `transformers serve` -----

def _serve_unavailable() -> str | None:
    try:
        has_completions = importlib.util.find_spec("transformers.cli.serving.completion") is not None
    except ModuleNotFoundError:  # 4.x: no `transformers.cli` package at all
        has_completions = False
    if not has_completions:
        return "this transformers has no `transformers serve` /v1/completions (added in 5.14)"
    missing = [name for name in ("fastapi", "uvicorn", "openai", "pydantic", "typer")
               if importlib.util.find_spec(name) is None]
    if missing:
        return f"`transformers serve` needs {', '.join(missing)} (pip install 'hf_specapprox[serving]')"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_serve_unavailable() is not None, reason=str(_serve_unavailable()))
def test_text_path_against_transformers_serve(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    # A Llama model: `transformers serve` loads its tokenizer with AutoTokenizer, which keeps the tiny word-level
    # tokenizer for Llama (for Qwen2 it would build Qwen2's own BPE around it).
    served = tmp_path / "model"
    setup["draft"].save_pretrained(served)
    setup["tokenizer"].save_pretrained(served)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", str(served), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"`transformers serve` exited ({process.returncode}):\n"
                            f"{(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        f"http://127.0.0.1:{port}/v1/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "`transformers serve` did not start within 120 s"
            time.sleep(0.5)

        client = client_for(setup, f"http://127.0.0.1:{port}/v1", timeout=60)
        client.model = str(served)
        result = client.complete(setup["prompt"], max_tokens=5, temperature=0.0)
        # "auto": the server refuses token ids (400, "prompt must be a string."), the client sends the text once.
        assert "prompt must be a string" in result.stats["text_fallback_reason"]
        assert result.stats["prompt_format"] == "text" and result.stats["text_roundtrip_exact"] is True
        assert setup["tokenizer"](result.sent_prompt)["input_ids"] == setup["kept_ids"]
        assert result.stats["server_prompt_tokens"] == len(setup["kept_ids"])  # the server's own count
        # The server's greedy answer is the served model's greedy answer on the kept tokens.
        model = AutoModelForCausalLM.from_pretrained(served).eval()
        kept = torch.tensor([setup["kept_ids"]])
        expected = model.generate(kept, attention_mask=torch.ones_like(kept), max_new_tokens=5, do_sample=False)
        assert result.text == setup["tokenizer"].decode(expected[0, kept.shape[1]:], skip_special_tokens=True)

        stream = client.complete(setup["prompt"], max_tokens=5, temperature=0.0, stream=True)
        chunks = list(stream)
        assert "".join(chunks) == stream.result.text == result.text
        assert stream.result.stats["stream_complete"] is True and stream.result.stats["prompt_format"] == "text"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


# ----- a hostile or broken server: issue 27, items 7, 9, 10, 11, 15 and 18 -----

@pytest.mark.parametrize("mode", ["choices_dict", "choices_int", "deep_json", "big_int", "huge_length"])
def test_malformed_answers_keep_the_compressed_prompt(setup, mode):
    """Item 7. Before: raw KeyError / TypeError / RecursionError / ValueError / MemoryError, the prompt lost."""
    with FakeCompletions(mode=mode) as server:
        with pytest.raises(ServingError) as caught:
            client_for(setup, server, prompt_format="ids").complete(setup["prompt"], max_tokens=4)
    assert_nothing_lost(caught.value, setup)


@pytest.mark.parametrize("mode", ["trickle", "keepalive"])
def test_a_server_that_trickles_or_only_keeps_alive_hits_the_deadline(setup, mode):
    """Item 9. Before: `timeout=1` waited forever (the timeout was per read)."""
    with FakeCompletions(mode=mode) as server:
        client = client_for(setup, server, prompt_format="ids", timeout=1, deadline=2)
        start = time.perf_counter()
        with pytest.raises(ServingError) as caught:
            if mode == "trickle":
                client.complete(setup["prompt"], max_tokens=4)
            else:
                list(client.complete(setup["prompt"], max_tokens=4, stream=True))
        assert time.perf_counter() - start < 10
    assert_nothing_lost(caught.value, setup)


def test_a_redirect_to_another_origin_is_not_followed_and_gets_no_key(setup):
    """Item 10. Before: a 302 to another origin was followed with `Authorization: Bearer` and the custom headers."""
    with FakeCompletions() as elsewhere, FakeCompletions(mode="redirect") as server:
        server.redirect_to = elsewhere.base_url + "/completions"
        client = client_for(setup, server, prompt_format="ids", api_key="sk-secret", headers={"X-Team": "7"})
        with pytest.raises(ServingError, match="redirect") as caught:
            client.complete(setup["prompt"], max_tokens=4)
    assert elsewhere.requests == [] and caught.value.status == 302
    assert_nothing_lost(caught.value, setup)


@pytest.mark.parametrize("mode", ["huge_body", "huge_line"])
def test_answers_larger_than_the_cap_are_not_read(setup, mode):
    """Item 11. Before: a 60 MB body for `max_tokens=4` was read whole; a 60 MB SSE line was buffered."""
    with FakeCompletions(mode=mode) as server:
        client = client_for(setup, server, prompt_format="ids")
        with pytest.raises(ServingError, match="larger than|more than") as caught:
            if mode == "huge_body":
                client.complete(setup["prompt"], max_tokens=4)
            else:
                list(client.complete(setup["prompt"], max_tokens=4, stream=True))
    assert_nothing_lost(caught.value, setup)


@pytest.mark.parametrize("mode", ["stream_bad_utf8", "stream_choices_dict", "stream_deep"])
def test_a_malformed_stream_event_keeps_the_text_so_far(setup, mode):
    """Item 15. Before: raw UnicodeDecodeError / KeyError / RecursionError mid-iteration; `.result` "still open"."""
    with FakeCompletions(mode=mode) as server:
        stream = client_for(setup, server, prompt_format="ids").complete(setup["prompt"], max_tokens=4, stream=True)
        received = []
        with pytest.raises(ServingError) as caught:
            for chunk in stream:
                received.append(chunk)
    assert received == ["w5"] and stream.result.text == "w5" and caught.value.result.text == "w5"
    assert_nothing_lost(caught.value, setup)


def test_bad_keys_urls_and_values_are_refused_before_the_draft_runs(setup):
    """Item 18. Before: a key with CR/LF failed after the draft ran, `user:pw@` in the URL passed then said "cannot be
    resolved", a query string built `/v1?key=1/completions`, and `temperature=nan` was sent as bare `NaN`."""
    specpc = SpecPCPreprocessor(setup["draft"], CONFIG)
    url = "http://127.0.0.1:9/v1"
    with pytest.raises(ValueError, match="line breaks"):
        SpecPCClient(specpc, url, "m", api_key="sk-1\r\nX-Injected: 1")
    with pytest.raises(ValueError, match="line breaks"):
        SpecPCClient(specpc, url, "m", headers={"X-Trace": "a\nb"})
    with pytest.raises(ValueError, match="credentials"):
        SpecPCClient(specpc, "http://user:pw@127.0.0.1:9/v1", "m")
    with pytest.raises(ValueError, match="query"):
        SpecPCClient(specpc, "http://127.0.0.1:9/v1?key=1", "m")
    with pytest.raises(ValueError, match="deadline"):
        SpecPCClient(specpc, url, "m", deadline=float("inf"))
    client = SpecPCClient(specpc, url, "m")
    calls = []
    handle = setup["draft"].register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="NaN"):
            client.complete([3, 4, 5], max_tokens=2, temperature=float("nan"))
    finally:
        handle.remove()
    assert calls == []
