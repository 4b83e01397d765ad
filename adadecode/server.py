"""OpenAI-compatible HTTP server: `python -m adadecode serve --model M [--heads H] [--host 127.0.0.1 --port 8000]`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with
"stream": true), GET /health. The response's extra field "adadecode" holds the method, its options, the
generated token ids and the decoding statistics.

With --max-seqs 1, one sequence at a time: requests take the engine in arrival order (an asyncio.Lock is FIFO) and
decode on one worker thread (`LLM.run`). With --max-seqs N > 1, up to N requests decode together, their rows in the
same engine steps (`LLM(max_seqs=N)`, decoding/batch.py), each getting exactly the tokens it gets alone; up to
--max-queue more wait for a free sequence, and beyond that a request is refused at once with a 429 (code
"server_busy"): the KV caches are allocated once, for N sequences, and never grow. Either way a client that
disconnects sets its generation's cancel event, which stops it after the current token (its sequence is free at
the next step). Bad requests get OpenAI's error object
({"error": {"message", "type", "param", "code"}}) with a 4xx status; an engine failure is a 500 for that request
only (mid-stream: an error event, then the end of the stream). The server keeps serving either way.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import secrets
import threading
import time
import uuid
from typing import Literal, Optional

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import LLM, METHODS, Cancelled, Completion, Delta
from .decoding import methods
from .engines.sampling import make_sampling
from .errors import CONTEXT_LENGTH_EXCEEDED, BadOption

log = logging.getLogger("adadecode.server")
# the request field of an LLM.prepare keyword where their names differ (errors carry the keyword: BadOption.param)
REQUEST_FIELDS = {"max_new_tokens": "max_tokens"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_response(status: int, message: str, param=None, code=None, type_="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def sampling_options(body: "_Common") -> dict:
    """The decoding options that OpenAI's sampling parameters ask for (adadecode.engines.sampling).

    temperature None or 0 is greedy: this server's default, unlike OpenAI's 1, so a request that names no
    temperature gets the model's greedy answer. With temperature > 0, top_p, top_k (adadecode's own) and seed
    apply; a request without a seed gets a fresh random one, reported in the response's "adadecode" field, so the
    same text can be asked for again. Every method gives the same tokens for the same seed."""
    if not body.temperature:
        return {}
    seed = secrets.randbits(63) if body.seed is None else body.seed
    options = {"temperature": body.temperature, "top_k": body.top_k or 0,
               "top_p": 1.0 if body.top_p is None else body.top_p, "seed": seed}
    try:
        make_sampling(**options)
    except ValueError as e:
        raise ApiError(400, str(e), param=getattr(e, "param", None)) from None
    return options


# ---- requests ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    """Values as JSON types, as OpenAI's API takes them: "5" is not an integer, "yes" not a boolean and NaN not a
    temperature (pydantic's lax mode would convert the first two, and report the third as out of range). An
    integer is still a number."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class _StreamOptions(_Strict):
    include_usage: bool = False


class _CommonBase(_Strict):
    model_config = ConfigDict(extra="allow")  # fields OpenAI clients send that change nothing here (user, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    top_k: int | None = Field(None, ge=0)  # adadecode's own (the openai client sends it with extra_body={...})

    def unsupported(self) -> None:
        """Refuse what would change the answer and that this server cannot do."""
        checks = [("n", self.n not in (None, 1), "one choice per request (n=1)"),
                  ("presence_penalty", bool(self.presence_penalty), "no penalties"),
                  ("frequency_penalty", bool(self.frequency_penalty), "no penalties"),
                  ("logit_bias", bool(self.logit_bias), "no logit_bias")]
        for param, bad, what in checks + self._unsupported():
            if bad:
                raise ApiError(400, f"{param}: this server supports {what}", param=param, code="unsupported_value")

    def _unsupported(self) -> list:
        return []


# adadecode's method and its options (the openai client sends them with extra_body={...}): the fields the registry
# declares (adadecode.decoding.methods), each of the type its option accepts; a request that names none gets the
# server's defaults (--method and the method's flags)
METHOD_FIELDS = ("method",) + tuple(methods.options())
_Common = create_model(
    "_Common", __base__=_CommonBase, method=(Optional[Literal[methods.names()]], None),
    **{o.name: (Optional[o.accepts or o.type], None) for o in methods.options().values()})


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def _unsupported(self) -> list:
        return [("echo", bool(self.echo), "no echo"), ("logprobs", self.logprobs is not None, "no logprobs"),
                ("best_of", self.best_of not in (None, 1), "best_of=1 only"), ("suffix", bool(self.suffix), "no suffix")]


class _TextPart(_Strict):
    type: str
    text: str | None = None


class _Message(_Strict):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # required, and not null: OpenAI allows a null content only beside tool_calls, which this server refuses
    content: str | list[_TextPart]


class ChatRequest(_Common):
    messages: list[_Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None

    def _unsupported(self) -> list:
        fmt = (self.response_format or {}).get("type", "text")
        return [("logprobs", bool(self.logprobs), "no logprobs"), ("tools", bool(self.tools), "no tools"),
                ("response_format", fmt != "text", "response_format text only")]


# ---- the engine's queue --------------------------------------------------------------------------------------
class _Job:
    """One generation on the engine's worker thread; its Deltas (stream) or Completion, or its error, arrive on
    an asyncio queue."""

    def __init__(self, server: "Server", req, stream: bool):
        self.loop, self.queue, self.cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        self.future = self.loop.run_in_executor(server.executor, self._work, server.llm, req, stream)

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _work(self, llm: LLM, req, stream: bool):
        try:
            done = llm.run(req, on_text=self._put if stream else None, cancel=self.cancel)
            if not stream:
                self._put(done)
            return done
        except BaseException as e:  # noqa: BLE001 (handed to the request's task)
            self._put(e)
            return e

    async def stop(self):
        """Cancel (if still running) and wait until the engine is free; not interruptible. -> the outcome."""
        self.cancel.set()
        with anyio.CancelScope(shield=True):
            return await asyncio.shield(self.future)


class _EngineStream(StreamingResponse):
    """A streaming response that frees the engine when it ends, however it ends (done, disconnect, error)."""

    def __init__(self, content, release):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.release()


DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


class BodyLimit:
    """ASGI wrapper: a POST body over `limit` bytes gets a 413 before any of it is parsed (by Content-Length, or
    counted as it arrives), so a huge request costs neither the event loop's time nor the server's memory."""

    DRAIN = 256 * 2**20

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, receive, send, size: str, drain: bool) -> None:
        # read the rest (kept nowhere) before answering: a client still sending when the connection closes gets a
        # reset instead of the 413; past DRAIN bytes, the connection is closed on it
        received = 0
        while drain and received <= self.DRAIN:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                break
            received += len(msg.get("body", b""))
        body = json.dumps({"error": {"message": f"the request body is {size} bytes, over this server's limit of "
                                                f"{self.limit} bytes (--max-request-bytes)",
                                     "type": "invalid_request_error", "param": None, "code": "request_too_large"}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(receive, send, length.decode(), drain=int(length) <= self.DRAIN)
        chunks, total = [], 0
        while True:  # read (and bound) the whole body here; the app then reads it from memory
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away before its body arrived
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                return await self._refuse(receive, send, f"more than {self.limit}", drain=msg.get("more_body", False))
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        del chunks

        async def replay():
            return pending.pop() if pending else await receive()  # then: the client's disconnect, as before

        return await self.app(scope, replay, send)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Server:
    def __init__(self, llm: LLM, model_name: str, defaults: dict | None = None, max_queue: int = 64):
        self.llm, self.model_name, self.defaults = llm, model_name, dict(defaults or {})
        self.batched = llm.max_seqs > 1
        self.capacity = llm.max_seqs + max_queue  # requests in the server at once (batched): decoding or waiting
        self.inflight = 0
        # one thread per request in flight when batched (each waits in LLM.run while the batch decodes it)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.capacity if self.batched else 1,
                                                              thread_name_prefix="adadecode-engine")
        # tokenising and checking a request takes time in proportion to its prompt: on its own threads, never on the
        # event loop (health checks and streams go on meanwhile); two: a long prompt does not hold up a short one
        self.preparer = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="adadecode-prepare")
        self.lock = asyncio.Lock()
        self.active: _Job | None = None  # the job on the engine
        self.waiting = 0  # requests waiting for the engine
        self.created = int(time.time())
        self._longest: int | None = None  # the vocabulary's longest token, in characters

    # -- request -> LLM request
    async def prepare_async(self, body: _Common, prompt=None, messages=None):
        return await asyncio.get_running_loop().run_in_executor(self.preparer, self.prepare, body, prompt, messages)

    def prepare(self, body: _Common, prompt=None, messages=None):
        if body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        body.unsupported()
        options = sampling_options(body)
        extra = {}
        for k in METHOD_FIELDS:  # the request's, else the server's
            v = getattr(body, k)
            v = self.defaults.get(k) if v is None else v
            if v is not None:
                extra[k] = v
        try:
            self._bound(prompt, messages)
            ids = self.llm.encode(prompt, messages=messages)
            max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
            if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
                max_tokens = 16 if messages is None else self.llm.max_context - len(ids)
                if max_tokens < 1:
                    raise BadOption(f"prompt of {len(ids)} tokens fills the context (max_seq={self.llm.max_context})",
                                    param="prompt", code=CONTEXT_LENGTH_EXCEEDED)
            return self.llm.prepare(ids, max_new_tokens=max_tokens, stop=body.stop, **extra, **options)
        except ValueError as e:  # a BadOption names its field (the LLM's keyword); other ValueErrors name none
            param = getattr(e, "param", None)
            raise ApiError(400, str(e), param=REQUEST_FIELDS.get(param, param), code=getattr(e, "code", None)) from None

    def _bound(self, prompt, messages) -> None:
        """Refuse text that cannot fit in the context before tokenising it: no token of this vocabulary covers more
        than `longest` characters (a normaliser may compose a few into one: the factor 4), so longer text cannot be
        under max_context tokens. Tokenising megabytes only to refuse them costs seconds and leaves the
        allocator's memory high."""
        tok = self.llm.tokenizer
        if tok is None:
            return
        if self._longest is None:
            self._longest = max(len(t) for t in tok.tok.get_vocab(with_added_tokens=True))
        texts = [prompt] if isinstance(prompt, str) else [str(m.get("content") or "") for m in messages or ()]
        chars = sum(len(t) for t in texts)
        if chars > 4 * self._longest * self.llm.max_context:
            raise BadOption(f"prompt of {chars} characters is longer than the context can hold "
                            f"(max_seq={self.llm.max_context} tokens)", param="prompt", code=CONTEXT_LENGTH_EXCEEDED)

    # -- decoding
    async def complete(self, request: Request, req, chat: bool, body: _Common):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if self.batched:
            return await self._complete_batched(request, req, chat, body, rid)
        if self.lock.locked():
            self.waiting += 1
            log.info("%s: queued, %d waiting", rid, self.waiting)
            try:
                await self.lock.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.lock.acquire()
        log.info("%s: on the engine: prompt_tokens=%d max_tokens=%d method=%s", rid, len(req.prompt),
                 req.max_new_tokens, req.method)
        try:
            if await request.is_disconnected():  # gave up while waiting its turn
                self.lock.release()
                return error_response(499, "the client disconnected", code="cancelled")
            job = self.active = _Job(self, req, body.stream)
        except BaseException:
            self.lock.release()
            raise

        async def release():
            outcome = await job.stop()
            self.active = None
            self.lock.release()
            if isinstance(outcome, Cancelled):
                log.info("%s: cancelled (client disconnected) after %d tokens", rid, outcome.tokens)

        return await self._respond(request, chat, body, rid, job, release)

    async def _complete_batched(self, request: Request, req, chat: bool, body: _Common, rid: str):
        if self.inflight >= self.capacity:
            log.info("%s: refused: %d requests in the server (--max-seqs + --max-queue)", rid, self.inflight)
            return error_response(429, f"the server is busy: {self.inflight} requests are decoding or waiting "
                                       f"(--max-seqs {self.llm.max_seqs} + --max-queue {self.capacity - self.llm.max_seqs});"
                                       f" retry later", type_="server_error", code="server_busy")
        self.inflight += 1
        log.info("%s: joins the batch: prompt_tokens=%d max_tokens=%d method=%s (%d in the server)", rid,
                 len(req.prompt), req.max_new_tokens, req.method, self.inflight)
        try:
            job = _Job(self, req, body.stream)
        except BaseException:
            self.inflight -= 1
            raise

        async def release():
            outcome = await job.stop()
            self.inflight -= 1
            if isinstance(outcome, Cancelled):
                log.info("%s: cancelled (client disconnected) after %d tokens", rid, outcome.tokens)

        return await self._respond(request, chat, body, rid, job, release)

    async def _respond(self, request: Request, chat: bool, body: _Common, rid: str, job, release):
        """The job's answer: one JSON body (the client watched for a disconnect meanwhile) or the event stream;
        `release` runs once the job is done either way."""
        if not body.stream:
            watch = asyncio.create_task(self._watch(request, job.cancel))
            try:
                item = await job.queue.get()
            finally:
                watch.cancel()
                await release()
            if isinstance(item, BaseException):
                return self._failed(rid, item)
            return JSONResponse(self._body(rid, chat, item))
        first = await job.queue.get()
        if isinstance(first, BaseException):
            await release()
            return self._failed(rid, first)
        return _EngineStream(self._events(rid, chat, body, job, first), release)

    async def _watch(self, request: Request, cancel: threading.Event) -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.05)

    def _failed(self, rid: str, e: BaseException) -> JSONResponse:
        if isinstance(e, Cancelled):  # nobody reads this: the client is gone
            return error_response(499, "the client disconnected", code="cancelled")
        if isinstance(e, ValueError):
            log.info("%s: refused: %s", rid, e)
            return error_response(400, str(e))
        log.error("%s: engine error: %s: %s", rid, type(e).__name__, e)
        return error_response(500, f"engine error: {type(e).__name__}: {e}", type_="server_error", code="engine_error")

    def _usage(self, c: Completion) -> dict:
        n, m = len(c.prompt_tokens), len(c.tokens)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def _extra(self, c: Completion) -> dict:
        return _finite({"method": c.method, "engine": c.engine, "options": c.options, "tokens": c.tokens,
                        "ms_per_token": c.ms_per_token, "stats": c.stats})

    def _log(self, rid: str, c: Completion) -> None:
        log.info("%s: finish_reason=%s prompt_tokens=%d completion_tokens=%d method=%s", rid, c.finish_reason,
                 len(c.prompt_tokens), len(c.tokens), c.method)

    def _head(self, rid: str, chat: bool, stream: bool) -> dict:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name}

    def _body(self, rid: str, chat: bool, c: Completion) -> dict:
        self._log(rid, c)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                      "finish_reason": c.finish_reason}
        else:
            choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        return {**self._head(rid, chat, False), "choices": [choice], "usage": self._usage(c), "adadecode": self._extra(c)}

    def _chunk(self, rid: str, chat: bool, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if role else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head(rid, chat, True), "choices": [choice]}

    async def _events(self, rid: str, chat: bool, body: _Common, job: _Job, first: Delta):
        if chat:
            yield _sse(self._chunk(rid, chat, "", role=True))
        item = first
        while True:
            if isinstance(item, BaseException):
                if isinstance(item, Cancelled):
                    return
                log.error("%s: engine error mid-stream: %s: %s", rid, type(item).__name__, item)
                yield _sse({"error": {"message": f"engine error: {type(item).__name__}: {item}", "type": "server_error",
                                      "param": None, "code": "engine_error"}})
                return
            if item.text:
                yield _sse(self._chunk(rid, chat, item.text))
            c = item.completion
            if c is not None:
                self._log(rid, c)
                last = self._chunk(rid, chat, None, finish=c.finish_reason)
                yield _sse({**last, "adadecode": self._extra(c)})
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield _sse({**self._head(rid, chat, True), "choices": [], "usage": self._usage(c)})
                yield "data: [DONE]\n\n"
                return
            item = await job.queue.get()


def _chat_messages(body: ChatRequest) -> list[dict]:
    if not body.messages:
        raise ApiError(400, "messages: give at least one message", param="messages")
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p.text for p in content)
        out.append({"role": m.role, "content": content})
    return out


def _completion_prompt(body: CompletionRequest):
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise ApiError(400, f"prompt: one prompt per request (got {len(p)})", param="prompt")
        p = p[0]
    if isinstance(p, str) and p == "" or isinstance(p, list) and not p:
        raise ApiError(400, "prompt: empty prompt", param="prompt")
    return p


def create_app(llm: LLM, model_name: str, defaults: dict | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_queue: int = 64):
    """The ASGI app serving `llm` as `model_name`; `defaults`: method options for requests that give none; a POST
    body over `max_request_bytes` is a 413; with llm.max_seqs > 1, more than llm.max_seqs + max_queue requests in
    the server at once is a 429."""
    server = Server(llm, model_name, defaults, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if server.active is not None:  # shutting down: stop the generation so that its thread ends now
            server.active.cancel.set()
        llm.close()  # the batching thread, with whatever it holds
        server.executor.shutdown(wait=False)
        server.preparer.shutdown(wait=False)

    app = FastAPI(title="adadecode", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        if err.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({err.get('msg')})")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        return error_response(400, f"{'.'.join(loc) or 'body'}: {err.get('msg')}", param=loc[0] if loc else None)

    @app.exception_handler(RecursionError)
    async def _nested(request, e: RecursionError):  # json.loads of a body nested thousands deep
        return error_response(400, "the request body is nested too deeply to parse")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug: still OpenAI's error object, not a plain-text 500
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type_="server_error",
                              code="internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "adadecode", "max_model_len": llm.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        req = await server.prepare_async(body, prompt=_completion_prompt(body))
        return await server.complete(request, req, chat=False, body=body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        req = await server.prepare_async(body, messages=_chat_messages(body))
        return await server.complete(request, req, chat=True, body=body)

    limited = BodyLimit(app, max_request_bytes)
    limited.state = app.state  # what the tests and main reach through the wrapper
    return limited


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model as given)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="a request body over this many bytes is refused with a 413 before it is parsed (default 4 MiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--max-seqs", type=int, default=1,
                   help="requests decoded together, their rows in the same steps, each answer the one it gets alone "
                        "(default 1: one at a time); the engine holds a KV cache of --max-seq positions for each")
    p.add_argument("--max-queue", type=int, default=64,
                   help="with --max-seqs > 1: requests that may wait for a free sequence; one more is a 429")


def main(args, llm: LLM) -> int:
    import uvicorn

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(name)s: %(message)s")
    engine = llm.engine  # build it now: errors before serving, no wait on the first request
    defaults = {k: getattr(args, k) for k in METHOD_FIELDS}
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    app = create_app(llm, args.served_model_name or args.model, defaults, max_request_bytes=args.max_request_bytes,
                     max_queue=args.max_queue)
    log.info("serving %s as %r on engine %s (max_seq %d), methods %s", llm.model.source,
             args.served_model_name or args.model, engine.name, llm.max_context,
             ", ".join(m for m in METHODS if not methods.get(m).needs_heads or llm.heads))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
