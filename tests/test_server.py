"""`python -m adadecode serve` as a real process on a loopback port, driven by the official `openai` client.

Most tests use a tiny random model with a byte-level tokenizer (characters outside ASCII take several tokens,
so text streaming must cut pieces on character boundaries); one checks the default model against the CLI.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from adadecode import LLM  # noqa: E402
from adadecode.engines.head import Head  # noqa: E402
from adadecode.heads.files import save_heads  # noqa: E402
from adadecode.model.loader import write_hf_dir  # noqa: E402
from conftest import tiny_chat_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the package under test, whatever the working directory
CONTEXT = 2048
PROMPTS = ["hello", "über naïve café", "The quick brown fox", "1 2 3 4", "€uro ✓", "abc", "ping", "zz top"]


class Server:
    """`python -m adadecode serve ...` on a free loopback port; its log goes to a file."""

    def __init__(self, args: list[str], log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "adadecode", "serve", *args, "--port", str(self.port),
                                      "--engine", "torch", "--device", "cpu", "--dtype", "fp32"],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after 180 s:\n{log.read_text()}")
            time.sleep(0.1)

    def client(self, timeout: float = 120):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)

    def post(self, path: str, body: bytes | dict):
        """(status, JSON body) of a raw POST."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def mark(self) -> int:
        return len(self.log.read_text())

    def log_since(self, mark: int) -> str:
        return self.log.read_text()[mark:]

    def wait_for_log(self, pattern: str, mark: int, count: int = 1, timeout: float = 60) -> list:
        """The first `count` matches of `pattern` in the log after `mark`, waiting for them (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log_since(mark)))
            if len(found) >= count:
                return found[:count]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} log lines matching {pattern!r}:\n{self.log_since(mark)}")
            time.sleep(0.02)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny chat model as an HF directory, with identity heads at layers 1 and 3 (they exit often)."""
    d = tmp_path_factory.mktemp("tiny-chat")
    model = tiny_chat_model(max_position_embeddings=CONTEXT)
    write_hf_dir(model, d)
    save_heads(d / "heads.safetensors", [Head.identity(1, model.cfg.d), Head.identity(3, model.cfg.d)],
               LLM(str(d)).model, {"gamma": 0.02, "description": "identity heads, server tests"})
    return d


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    """The same model in this process: the reference for what the server must answer."""
    return LLM(str(tiny_dir), heads=str(tiny_dir / "heads.safetensors"), engine="torch", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = Server(["--model", str(tiny_dir), "--heads", str(tiny_dir / "heads.safetensors"), "--method", "vanilla",
                  "--served-model-name", "tiny"], tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.stop()


def test_models(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny"]


@pytest.mark.parametrize("method", ["vanilla", "adadecode", "layerskip"])
def test_completion_streamed_and_not(server, tiny_llm, method):
    ref = tiny_llm.generate("über naïve café", max_new_tokens=40, method="vanilla")
    c = server.client()
    out = c.completions.create(model="tiny", prompt="über naïve café", max_tokens=40, extra_body={"method": method})
    ext = out.model_extra["adadecode"]
    assert ext["tokens"] == ref.tokens and out.choices[0].text == ref.text
    assert ext["method"] == method and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_tokens) and out.usage.completion_tokens == len(ref.tokens)
    assert out.usage.total_tokens == len(ref.prompt_tokens) + len(ref.tokens)
    if method == "adadecode":
        assert ext["stats"]["early"] > 0 and ext["options"]["gamma"] == 0.02
    pieces, finish, extra = [], None, None
    for chunk in c.completions.create(model="tiny", prompt="über naïve café", max_tokens=40, stream=True,
                                      extra_body={"method": method}):
        pieces.append(chunk.choices[0].text)
        finish = finish or chunk.choices[0].finish_reason
        extra = (chunk.model_extra or {}).get("adadecode") or extra
    assert "".join(pieces) == ref.text and finish == ref.finish_reason
    assert extra["tokens"] == ref.tokens and len([p for p in pieces if p]) > 1


def test_chat_streamed_and_not(server, tiny_llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Grüße! ✓"}]
    ref = tiny_llm.generate(messages=messages, max_new_tokens=30, method="vanilla")
    c = server.client()
    out = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    assert out.model_extra["adadecode"]["tokens"] == ref.tokens and out.usage.prompt_tokens == len(ref.prompt_tokens)
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"method": "adadecode"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.tokens)


def test_stop_strings(server, tiny_llm):
    ref = tiny_llm.generate("The quick brown fox", max_new_tokens=40, method="vanilla")
    # a random model's bytes are mostly not UTF-8 (U+FFFD in the text): stop at its first printable character
    printable = [i for i in range(3, len(ref.text) - 1) if ref.text[i].isprintable() and ref.text[i] != "\ufffd"]
    assert printable, ref.text
    stop = ref.text[printable[0]]
    cut = ref.text[:ref.text.find(stop)]
    c = server.client()
    out = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=40, stop=[stop, "never seen"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.model_extra["adadecode"]["tokens"] == ref.tokens[:len(out.model_extra["adadecode"]["tokens"])]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=40, stop=stop, stream=True))
    assert streamed == cut
    assert c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=3).choices[0].finish_reason == "length"


def ask_all(srv, max_tokens: int, request) -> dict:
    """Every prompt of PROMPTS from its own thread and client at once, the odd ones streamed; request(i) gives the
    i-th one's extra_body (None: none) and sampling fields. Returns {prompt: text}; any client error fails."""
    got, errors = {}, []

    def ask(i, p):
        extra, sampling = request(i)
        kw = dict(model="tiny", prompt=p, max_tokens=max_tokens, **sampling)
        if extra is not None:
            kw["extra_body"] = extra
        try:
            c = srv.client()
            if i % 2:
                got[p] = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw))
            else:
                got[p] = c.completions.create(**kw).choices[0].text
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return got


def test_concurrent_clients_all_answered_correctly(server, tiny_llm):
    want = {p: tiny_llm.generate(p, max_new_tokens=24, method="vanilla").text for p in PROMPTS}
    got = ask_all(server, 24, lambda i: ({"method": "adadecode"}, {}) if i % 2 else (None, {}))
    assert got == want


def test_requests_take_the_engine_in_arrival_order(server):
    mark = server.mark()
    c = server.client()
    holder = c.completions.create(model="tiny", prompt="ping", max_tokens=CONTEXT - 8, stream=True)
    next(iter(holder))  # it holds the engine now
    budgets = [3, 4, 5, 6, 7]
    threads = []
    for i, n in enumerate(budgets):
        threads.append(threading.Thread(target=lambda n=n: c.completions.create(model="tiny", prompt="abc", max_tokens=n)))
        threads[-1].start()
        server.wait_for_log(r": queued, ", mark, count=i + 1)  # in the queue before the next one is sent
    holder.close()
    for t in threads:
        t.join(timeout=120)
    order = [int(n) for n in re.findall(r"on the engine: prompt_tokens=\d+ max_tokens=(\d+)", server.log_since(mark))]
    assert order == [CONTEXT - 8] + budgets


def test_disconnect_mid_stream_frees_the_engine(server, tiny_llm):
    mark = server.mark()
    c = server.client()
    stream = c.completions.create(model="tiny", prompt="ping", max_tokens=CONTEXT - 8, stream=True)
    n = 0
    for chunk in stream:
        n += bool(chunk.choices[0].text)
        if n == 3:
            break
    stream.close()
    (m,) = server.wait_for_log(r"(cmpl-\w+): cancelled \(client disconnected\) after (\d+) tokens", mark)
    assert int(m.group(2)) < CONTEXT - 8  # stopped long before its budget
    out = c.completions.create(model="tiny", prompt="abc", max_tokens=8)
    assert out.choices[0].text == tiny_llm.generate("abc", max_new_tokens=8, method="vanilla").text
    assert f"{m.group(1)}: finish_reason" not in server.log.read_text()


def test_disconnect_without_streaming_frees_the_engine(server, tiny_llm):
    """A client that gives up on a plain (not streamed) request, e.g. on a timeout: the server notices too."""
    import http.client

    mark = server.mark()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": CONTEXT - 8}),
                 {"Content-Type": "application/json"})
    server.wait_for_log(r"on the engine: prompt_tokens=\d+ max_tokens=%d" % (CONTEXT - 8), mark)
    conn.close()  # gone before the answer
    (m,) = server.wait_for_log(r"(cmpl-\w+): cancelled \(client disconnected\) after (\d+) tokens", mark)
    assert int(m.group(2)) < CONTEXT - 8
    out = server.client().completions.create(model="tiny", prompt="abc", max_tokens=8)
    assert out.choices[0].text == tiny_llm.generate("abc", max_new_tokens=8, method="vanilla").text
    assert f"{m.group(1)}: finish_reason" not in server.log.read_text()


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": [5] * (CONTEXT + 1)}, 400, None),
    ({"model": "tiny", "prompt": "hi", "max_tokens": CONTEXT}, 400, None),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "temperature": 0.7, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "hi", "temperature": 0.7, "top_k": -1}, 400, "top_k"),
    ({"model": "tiny", "prompt": "hi", "temperature": 0.7, "seed": -1}, 400, "seed"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": "tiny", "prompt": "hi", "method": "beam"}, 400, "method"),
    ({"model": "tiny", "prompt": "hi", "method": "adadecode", "max_pending": 0}, 400, "max_pending"),
    ({"model": "tiny", "prompt": "hi", "method": "layerskip", "head_layer": 2}, 400, "head_layer"),
    ({"model": "tiny", "prompt": "hi", "method": "layerskip", "k": 0}, 400, "k"),
    ({"model": "tiny", "prompt": "hi", "method": "adadecode", "gamma": 7}, 400, "gamma"),
    ({"model": "tiny", "prompt": [999999]}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
])
def test_bad_completion_requests(server, body, status, param):
    code, out = server.post("/v1/completions", body)
    assert code == status, out
    err = out["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param, err
    if "max_tokens" in body and body["max_tokens"] == CONTEXT or isinstance(body.get("prompt"), list) and len(body["prompt"]) > CONTEXT:
        assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body", [
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "tiny", "messages": "hi"},
    {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
])
def test_bad_chat_requests(server, body):
    code, out = server.post("/v1/chat/completions", body)
    assert code == 400 and out["error"]["message"], out


def test_bad_json_and_the_server_keeps_serving(server, tiny_llm):
    code, out = server.post("/v1/completions", b'{"model": "tiny", "prompt": ')
    assert code == 400 and "JSON" in out["error"]["message"]
    code, out = server.post("/v1/nowhere", {})
    assert code == 404 and "error" in out
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client().completions.create(model="tiny", prompt="hi", temperature=-1.0)
    out = server.client().completions.create(model="tiny", prompt="hi", max_tokens=5)
    assert out.choices[0].text == tiny_llm.generate("hi", max_new_tokens=5, method="vanilla").text


def test_sampling_with_a_seed_is_vanilla_sampling_with_that_seed(server, tiny_llm):
    """OpenAI's temperature / top_p / seed (and adadecode's top_k) are seeded sampling: the same text as the API's
    vanilla sampling with that seed, streamed or not; without a seed the server draws one and reports it."""
    opts = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    ref = tiny_llm.generate("über naïve café", max_new_tokens=12, method="vanilla", top_k=20, **opts)
    greedy = tiny_llm.generate("über naïve café", max_new_tokens=12, method="vanilla")
    assert ref.tokens != greedy.tokens  # the test must be able to tell sampling from greedy
    out = server.client().completions.create(model="tiny", prompt="über naïve café", max_tokens=12,
                                             extra_body={"top_k": 20}, **opts)
    assert out.choices[0].text == ref.text
    assert out.model_extra["adadecode"]["tokens"] == ref.tokens
    assert out.model_extra["adadecode"]["options"]["sampling"] == {"top_k": 20, **opts}
    pieces = server.client().completions.create(model="tiny", prompt="über naïve café", max_tokens=12, stream=True,
                                                extra_body={"top_k": 20}, **opts)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == ref.text
    # top_p without a temperature is greedy (the argmax is always inside the nucleus)
    out = server.client().completions.create(model="tiny", prompt="über naïve café", max_tokens=12, top_p=0.5)
    assert out.choices[0].text == greedy.text
    unseeded = server.client().completions.create(model="tiny", prompt="über naïve café", max_tokens=12,
                                                  temperature=0.9)
    seed = unseeded.model_extra["adadecode"]["options"]["sampling"]["seed"]
    again = tiny_llm.generate("über naïve café", max_new_tokens=12, method="vanilla", temperature=0.9, seed=seed)
    assert unseeded.choices[0].text == again.text


class InProcessServer:
    """The app on uvicorn in a thread of this process: a test can then reach into the model it serves."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "in-process server did not start"
            time.sleep(0.05)

    def client(self, timeout: float = 120):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_engine_error_is_a_500_for_that_request_only(tmp_path):
    """Non-finite weights for one token: a request that generates it fails mid-generation, the others are fine.
    Such weights are refused at load (tests/test_bad_input.py), so they are poisoned in memory, after the load, as
    a fault in the engine's memory would be."""
    import torch

    from adadecode.server import create_app

    model = tiny_chat_model(seed=3, max_position_embeddings=256)
    write_hf_dir(model, tmp_path / "clean")  # the weights as the server will read them (bf16)
    llm = LLM(str(tmp_path / "clean"), engine="torch", device="cpu", dtype="fp32")
    model = llm.model
    gens = {p: llm.generate(p, max_new_tokens=8, method="vanilla") for p in PROMPTS + [p + "!" for p in PROMPTS]}
    # the bad prompt's second token, poisoned: its prefill and first token are fine, the next step is not
    bad = [(p, g.tokens[1]) for p, g in gens.items() if len(g.tokens) > 2 and g.tokens[1] not in g.prompt_tokens
           and g.tokens[1] != g.tokens[0]]
    bad_prompt, poison, good_prompt = next((p, t, q) for p, t in bad for q, g in gens.items()
                                           if t not in g.tokens + g.prompt_tokens)
    served = LLM(str(tmp_path / "clean"), engine="torch", device="cpu", dtype="fp32", max_seq=256, max_rows=16)
    served.model.weights.embed[poison] = float("nan")
    srv = InProcessServer(create_app(served, "tiny"))
    try:
        c = srv.client()
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="tiny", prompt=bad_prompt, max_tokens=8)
        assert e.value.status_code == 500 and e.value.body["code"] == "engine_error"
        with pytest.raises(openai.APIError, match="engine error"):
            for _ in c.completions.create(model="tiny", prompt=bad_prompt, max_tokens=8, stream=True):
                pass
        out = c.completions.create(model="tiny", prompt=good_prompt, max_tokens=8)
        assert out.model_extra["adadecode"]["tokens"] == gens[good_prompt].tokens
    finally:
        srv.stop()
    assert torch.isnan(served.model.weights.embed[poison]).all()


@pytest.mark.slow
def test_default_model_matches_the_cli(default_model, tmp_path, capsys):
    """Greedy output through the server is token for token the CLI's (completions and chat, streamed and not)."""
    from adadecode.cli import main

    prompt, n = "Write a Python function that reverses a string.", 10

    def cli(*extra):
        assert main(["generate", "--model", "default", "--prompt", prompt, "--max-new-tokens", str(n), "--json",
                     "--engine", "torch", "--device", "cpu", "--dtype", "fp32", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain, chat = cli(), cli("--chat", "--method", "adadecode", "--heads", "default:code")
    srv = Server(["--model", "default", "--heads", "default:code"], tmp_path / "server.log")
    try:
        c = srv.client()
        out = c.completions.create(model="default", prompt=prompt, max_tokens=n, extra_body={"method": "vanilla"})
        assert out.model_extra["adadecode"]["tokens"] == plain["tokens"] and out.choices[0].text == plain["text"]
        text = "".join(ch.choices[0].text for ch in c.completions.create(model="default", prompt=prompt, max_tokens=n,
                                                                         stream=True))
        assert text == plain["text"]
        msgs = [{"role": "user", "content": prompt}]
        out = c.chat.completions.create(model="default", messages=msgs, max_tokens=n)
        assert out.model_extra["adadecode"]["tokens"] == chat["tokens"] and out.choices[0].message.content == chat["text"]
        assert out.model_extra["adadecode"]["method"] == "adadecode"
        assert out.usage.prompt_tokens == len(chat["prompt_tokens"])
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="default", messages=msgs, max_tokens=n, stream=True) if ch.choices)
        assert text == chat["text"]
    finally:
        srv.stop()


# ---- several requests in one step (--max-seqs, issue 36) -----------------------------------------------------------
@pytest.fixture(scope="module")
def batched(tiny_dir, tmp_path_factory):
    srv = Server(["--model", str(tiny_dir), "--heads", str(tiny_dir / "heads.safetensors"), "--method", "vanilla",
                  "--served-model-name", "tiny", "--max-seqs", "4", "--max-queue", "4"],
                 tmp_path_factory.mktemp("log") / "batched.log")
    yield srv
    srv.stop()


def test_batched_requests_get_their_answers_alone(batched, tiny_llm):
    """8 concurrent clients on a server that decodes 4 at once (streamed and not; vanilla, AdaDecode, lookup,
    AdaDecode with context, seeded sampling): every answer is the one the request gets alone, and the log shows the
    requests sharing the batch."""
    kinds = [dict(method="vanilla"), dict(method="adadecode"), dict(method="lookup"),
             dict(method="adadecode", context=True), dict(method="vanilla", temperature=0.8, seed=5)]
    want = {}
    for i, p in enumerate(PROMPTS):
        k = kinds[i % len(kinds)]
        opts = {key: v for key, v in k.items() if key not in ("temperature", "seed")}
        extra = dict(temperature=k["temperature"], seed=k["seed"]) if "temperature" in k else {}
        want[p] = tiny_llm.generate(p, max_new_tokens=40, **opts, **extra).text
    mark = batched.mark()

    def request(i):
        k = dict(kinds[i % len(kinds)])
        return k, {key: k.pop(key) for key in ("temperature", "seed") if key in k}

    got = ask_all(batched, 40, request)
    assert got == want
    joined = [int(m) for m in re.findall(r"joins the batch: .* \((\d+) in the server\)", batched.log_since(mark))]
    assert len(joined) == len(PROMPTS) and max(joined) > 1  # some requests were in the server together


def test_batched_server_refuses_past_its_queue_and_frees_cancelled_sequences(batched, tiny_llm):
    """4 decoding + 4 waiting: a 9th request at once is a 429 naming the limits; clients that disconnect free
    their sequences, and the server answers the next request right."""
    mark = batched.mark()
    go = threading.Event()

    def hold():
        stream = batched.client().completions.create(model="tiny", prompt="ping", max_tokens=CONTEXT - 8, stream=True)
        for _ in stream:
            if go.is_set():
                break
            time.sleep(0.05)  # a slow reader: its request stays in the server
        stream.close()

    threads = [threading.Thread(target=hold) for _ in range(8)]
    for t in threads:
        t.start()
    batched.wait_for_log(r"joins the batch: .* \(8 in the server\)", mark)
    status, body = batched.post("/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 4})
    go.set()
    for t in threads:
        t.join(timeout=120)
    assert status == 429 and body["error"]["code"] == "server_busy" and "--max-seqs 4" in body["error"]["message"]
    batched.wait_for_log(r"cancelled \(client disconnected\)", mark, count=4)
    out = batched.client().completions.create(model="tiny", prompt="abc", max_tokens=8)
    assert out.choices[0].text == tiny_llm.generate("abc", max_new_tokens=8, method="vanilla").text
