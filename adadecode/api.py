"""The Python API: load a model (and heads) once, then generate or stream from prompts or chat messages.

    import adadecode

    llm = adadecode.LLM("default", heads="default:code")        # or an HF directory, a .gguf file
    out = llm.generate("Write a Python function that reverses a string.", chat=True, max_new_tokens=64)
    print(out.text, out.finish_reason, out.stats["accepted"])   # method: adadecode where heads are loaded
    for piece in llm.stream(messages=[{"role": "user", "content": "Hi!"}], method="vanilla", stop=["\\n"]):
        print(piece.text, end="", flush=True)

One model, one engine, one sequence at a time: an LLM serialises its callers (a lock), and a call can be
cancelled between tokens (`cancel`, a threading.Event), which frees the engine at once. Every method gives the
tokens of vanilla greedy decoding; they differ in speed and statistics only.

The methods and their options are the registry's (adadecode.decoding.methods): `method=` takes a registered name,
and each method's options (gamma, max_pending / k, head_layer) are checked by its registration. Other keyword
arguments (the sampling options, for one) are passed through to the method's function
(`decoding.vanilla.generate_vanilla`, `decoding.driver.generate_adadecode`, `decoding.driver.generate_layerskip`);
one that the function does not take is a ValueError (BadOption naming it).
"""
from __future__ import annotations

import dataclasses
import threading
import time
import types
from typing import Callable, Iterator, Sequence

from .decoding import methods
from .decoding.methods import DEFAULT_GAMMA
from .decoding.common import check_request
from .engines.options import EngineOptions
from .engines.sampling import make_sampling
from .errors import BadOption
from .model.loader import Model, load_model

METHODS = methods.names()  # ("vanilla", "adadecode", "layerskip"): the registered decoding methods
# a request's stop strings, at most (docs/serving.md): OpenAI takes 4; these leave room for any real use
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 64 * 1024


class Cancelled(Exception):
    """The caller's cancel event was set: the generation stopped between two tokens and the engine is free."""

    def __init__(self, tokens: int = 0):
        super().__init__(f"cancelled after {tokens} tokens")
        self.tokens = tokens  # tokens generated before the cancel was seen


class _StopStringHit(Exception):
    pass


@dataclasses.dataclass
class Completion:
    """One finished generation."""

    text: str  # the generated text, cut before the stop string that ended it (special tokens skipped)
    tokens: list[int]  # generated ids: EOS included when it ended the text, up to the one completing a stop string
    prompt_tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)
    method: str
    engine: str
    options: dict  # the method's settings as used: heads, head_layers, gamma, max_pending / head_layer, k
    stats: dict  # Generation.stats (decoding/driver.py's docstring); cut short by a stop string: tokens only
    seconds: float
    ms_per_token: float  # after the first token
    stop: str | None = None  # the stop string that ended the text


@dataclasses.dataclass
class Delta:
    """A piece of a stream: new text and the tokens that produced it; the last piece carries the Completion."""

    text: str
    tokens: list[int]
    completion: Completion | None = None

    @property
    def finish_reason(self) -> str | None:
        return None if self.completion is None else self.completion.finish_reason


class StopMatcher:
    """Finds the first stop string in a text fed piece by piece (Knuth-Morris-Pratt, one automaton per string).

    `state[j]` is the length of the longest prefix of stop string j that ends the text fed so far: the longest
    of these is what a stream must hold back, since the next characters may complete it. A character costs
    amortised O(1) per stop string whatever its length (the state rises by one at most, and each fall-back
    lowers it), where testing every prefix length per token cost O(len(s)^2) and froze a server on one 3.9 MB
    stop string (issue 35). The failure table is built only as far as a state has risen, so a stop string longer
    than the text costs no more than the text does."""

    def __init__(self, stop: Sequence[str]):
        self.stop = list(stop)
        self.state = [0] * len(self.stop)
        self._fail = [[0] for _ in self.stop]  # _fail[j][i]: longest proper border of stop[j][:i + 1]

    @staticmethod
    def _extend(fail: list[int], s: str, n: int) -> None:
        k = fail[-1]
        for i in range(len(fail), n):
            while k and s[k] != s[i]:
                k = fail[k - 1]
            if s[k] == s[i]:
                k += 1
            fail.append(k)

    def feed(self, piece: str) -> tuple[int, str] | None:
        """Advance over `piece`; -> (the index in `piece` where the first stop string found begins, counted back
        from the piece's start, so possibly negative; that string), or None. First means the one completed
        earliest; of two completed at the same character, the longer (it began first)."""
        best = None
        for j, s in enumerate(self.stop):
            q, fail, n = self.state[j], self._fail[j], len(s)
            if q == 0 and s[0] not in piece:  # the common case, scanned in C
                continue
            for end, c in enumerate(piece):
                while q and s[q] != c:
                    q = fail[q - 1]
                if s[q] == c:
                    q += 1
                    if q == n:
                        if best is None or (end, -n) < best[:2]:
                            best = (end, -n, s)
                        break
                    if len(fail) < q:
                        self._extend(fail, s, q)
            self.state[j] = q
        if best is None:
            return None
        end, n, s = best
        return end + 1 + n, s

    @property
    def held(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        return max(self.state, default=0)


class TextStream:
    """Text of a growing token list, cut at the first stop string; `push` returns what may be shown now.

    Text that could be the start of a stop string is held back until the next tokens settle it."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        from .model.tokenizer import StreamDecoder

        self.decoder, self.stop = StreamDecoder(tokenizer), list(stop)
        self.matcher = StopMatcher(self.stop)
        self.text, self.sent, self.hit = "", 0, None

    def push(self, token: int) -> str:
        return self._take(self.decoder.push(token) if self.hit is None else "", final=False)

    def finish(self) -> str:
        return self._take(self.decoder.flush() if self.hit is None else "", final=True)

    def _take(self, piece: str, final: bool) -> str:
        if piece:
            old, self.text = len(self.text), self.text + piece
            found = self.matcher.feed(piece)
            if found:
                i, self.hit = found
                self.text = self.text[:old + i]
        end = len(self.text)
        if self.hit is None and not final:
            end -= self.matcher.held
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


def check_stop(stop) -> list[str]:
    """Stop strings as a list: non-empty strings, at most MAX_STOP_STRINGS of them and MAX_STOP_BYTES in all.

    The matcher's cost does not grow with a string's length, but a request that asks for more is no real use and
    would keep its megabytes for the whole generation; the bounds are documented in docs/serving.md."""
    if isinstance(stop, (bytes, dict)) or not (stop is None or isinstance(stop, (str, Sequence))):
        raise BadOption(f"stop must be a string or a list of strings, got {type(stop).__name__}", param="stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise BadOption(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are accepted", param="stop")
    bad = next((s for s in stop if not isinstance(s, str) or s == ""), None)
    if bad is not None:
        raise BadOption(f"stop must be non-empty strings, got {bad!r:.80}", param="stop")
    size = sum(len(s.encode("utf-8", "surrogatepass")) for s in stop)
    if size > MAX_STOP_BYTES:
        raise BadOption(f"stop strings hold {size} bytes (UTF-8) in all; at most {MAX_STOP_BYTES} are accepted",
                        param="stop")
    return stop


def check_messages(messages) -> list[dict]:
    """Chat messages as the template needs them: a non-empty list of {"role": str, "content": str} (the server's
    request model checks the same; a template handed an int content fails inside jinja2 otherwise)."""
    from .model.tokenizer import check_text

    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence) or not messages:
        raise BadOption(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}",
                        param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadOption(f"messages[{i}] must be an object with a string 'role', got {m!r:.80}", param="messages")
        check_text(m.get("content"), f"messages[{i}].content", param="messages")
        check_text(m["role"], f"messages[{i}].role", param="messages")
    return list(messages)


@dataclasses.dataclass
class _Request:
    prompt: list[int]
    max_new_tokens: int
    method: str
    kwargs: dict  # for the method's function
    options: dict
    stop: list[str]
    rows: int  # rows in flight the engine must hold


class _Run:
    """One request's text side while it decodes: its stop strings and streamed Deltas (on_token, called with each
    verified token), and its Completion at the end (finish)."""

    def __init__(self, llm: "LLM", req: _Request, on_text, cancel):
        self.llm, self.req, self.on_text, self.cancel = llm, req, on_text, cancel
        self.live = on_text is not None or bool(req.stop)
        self.text = TextStream(llm.tokenizer, req.stop) if self.live and llm.tokenizer is not None else None
        self.tokens: list[int] = []
        self.fresh: list[int] = []  # tokens not yet handed out in a Delta
        self.times: list[float] = []
        self.t0 = time.perf_counter()

    @property
    def on_token_arg(self):
        """What the method's function gets as on_token (None: nothing to do per token, as a bare call would)."""
        return self.on_token if (self.live or self.cancel is not None) else None

    def on_token(self, t: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(len(self.tokens))
        self.tokens.append(t)
        if len(self.times) < 2:
            self.times.append(time.perf_counter())
        else:
            self.times[1] = time.perf_counter()
        if not self.live:
            return
        self.fresh.append(t)
        text = self.text
        piece = text.push(t) if text is not None else ""  # no tokenizer: a Delta per token, no text
        if self.on_text is not None and (piece or text is None):
            self.on_text(Delta(piece, self.fresh[:]))
            self.fresh.clear()
        if text is not None and text.hit is not None:
            raise _StopStringHit()

    def finish(self, gen) -> Completion:
        """The Completion of the generation `gen` (None: cut by a stop string)."""
        llm, req, text, tokens, times = self.llm, self.req, self.text, self.tokens, self.times
        if gen is not None:
            tokens, stats, seconds, ms = gen.tokens, dict(gen.stats), gen.seconds, gen.ms_per_token
        else:
            stats = {"tokens": len(tokens), "cut_by_stop_string": True}
            seconds = times[-1] - self.t0
            ms = 1e3 * (times[-1] - times[0]) / (len(tokens) - 1) if len(tokens) > 1 else float("nan")
        if not methods.get(req.method).speculative:  # the same keys as a speculative method's, for every caller
            stats = {"tokens": len(tokens), "early": 0, "accepted": 0, "rejected": 0, **stats}
        tail = text.finish() if text is not None else ""
        if text is not None and text.hit is not None:
            finish, out_text = "stop", text.text
        else:
            finish = "stop" if tokens and tokens[-1] in llm.model.eos_ids else "length"
            out_text = text.text if text is not None else (llm.decode(tokens) if llm.tokenizer else "")
        done = Completion(text=out_text, tokens=list(tokens), prompt_tokens=req.prompt, finish_reason=finish,
                          method=req.method, engine=llm._engine.name, options=req.options, stats=stats,
                          seconds=seconds, ms_per_token=ms, stop=text.hit if text is not None else None)
        if self.on_text is not None:
            self.on_text(Delta(tail, self.fresh[:], completion=done))
        return done


class _Batcher:
    """The requests of an LLM with max_seqs > 1, decoded together on one thread (decoding/batch.py): each
    request joins at the next step once a sequence is free, leaves when it ends or is cancelled; its caller waits
    for its Completion (or exception) and gets its Deltas from this thread as they come."""

    def __init__(self, llm: "LLM"):
        from .decoding.batch import Batch

        self.llm = llm
        self.batch = Batch(llm._engine)
        self.cv = threading.Condition()
        self.pending: list[tuple[_Run, dict]] = []  # waiting for a sequence, in arrival order
        self.running: dict[int, tuple[_Run, dict]] = {}  # by sequence
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="adadecode-batch", daemon=True)
        self.thread.start()

    def run(self, req: _Request, on_text, cancel) -> Completion:
        if cancel is not None and cancel.is_set():
            raise Cancelled(0)
        e = self.llm._engine
        if req.rows > e.max_rows or len(req.prompt) + req.max_new_tokens > e.max_seq:
            raise BadOption(f"the request needs {req.rows} rows and {len(req.prompt) + req.max_new_tokens} positions;"
                            f" this LLM's sequences hold max_rows={e.max_rows}, max_seq={e.max_seq}",
                            param="max_tokens" if req.rows <= e.max_rows else "max_pending")
        r = _Run(self.llm, req, on_text, cancel)
        slot = {"done": threading.Event(), "result": None, "error": None}
        with self.cv:
            if self.stopping:
                raise RuntimeError("the LLM's batching thread has stopped")
            self.pending.append((r, slot))
            self.cv.notify()
        slot["done"].wait()
        if slot["error"] is not None:
            raise slot["error"]
        return slot["result"]

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(10)

    @staticmethod
    def _end(slot: dict, result=None, error=None) -> None:
        slot["result"], slot["error"] = result, error
        slot["done"].set()

    def _finish(self, r: _Run, slot: dict, gen) -> None:
        try:
            self._end(slot, result=r.finish(gen))
        except BaseException as e:  # noqa: BLE001 (the caller's on_text failed: its error, not the batch's)
            self._end(slot, error=e)

    def _loop(self) -> None:
        batch, llm = self.batch, self.llm
        while True:
            with self.cv:
                while not self.stopping and not self.pending and not batch.busy:
                    self.cv.wait()
                if self.stopping:
                    for r, slot in self.pending + list(self.running.values()):
                        self._end(slot, error=Cancelled(len(r.tokens)))
                    for seq in list(self.running):
                        batch.cancel(seq)
                    self.pending.clear()
                    self.running.clear()
                    return
                admit = []
                while self.pending and len(self.running) + len(admit) < llm.max_seqs:
                    admit.append(self.pending.pop(0))
            free = batch.free_seqs()
            for (r, slot), seq in zip(admit, free):
                if r.cancel is not None and r.cancel.is_set():
                    self._end(slot, error=Cancelled(0))
                    continue
                req = r.req
                try:
                    batch.add(seq, methods.get(req.method).function.steps, req.prompt, req.max_new_tokens,
                              eos_ids=llm.model.eos_ids, on_token=r.on_token_arg, **req.kwargs)
                except BaseException as e:  # noqa: BLE001 (this request's own bad arguments)
                    self._end(slot, error=e)
                    continue
                self.running[seq] = (r, slot)
            for seq, (r, slot) in list(self.running.items()):  # cancelled between steps: free the sequence now
                if r.cancel is not None and r.cancel.is_set():
                    batch.cancel(seq)
                    del self.running[seq]
                    self._end(slot, error=Cancelled(len(r.tokens)))
            if not batch.busy:
                continue
            try:
                ended = batch.step()
            except BaseException as e:  # noqa: BLE001 (a failure of the batch itself: every request in it)
                for seq, (r, slot) in list(self.running.items()):
                    batch.cancel(seq)
                    self._end(slot, error=e)
                self.running.clear()
                continue
            for job in ended:
                r, slot = self.running.pop(job.seq)
                if job.error is None:
                    self._finish(r, slot, job.generation)
                elif isinstance(job.error, _StopStringHit):
                    self._finish(r, slot, None)
                else:
                    self._end(slot, error=job.error)


class LLM:
    """A model on an engine, with optional intermediate heads, ready to decode.

    model: "default" (SmolLM2-135M-Instruct), an HF Llama checkpoint directory, a .gguf file, or a loaded
        `adadecode.Model`.
    heads: None, a head file, or "default" / "default:code" / "default:general" (the default model's heads).
    engine: "auto" (CUDA where it can run, else the CPU engine), "cuda", "cpu" (native CPU kernels), "torch" (the
        reference), or "emu" (the CUDA engine on the emulated device: the product's kernels on the CPU, slow); device
        and dtype: the torch engine's; threads: the CPU engine's (default: the cores this process may use). Or an
        adadecode.engines.options.EngineOptions holding every engine option; each is checked here (BadOption).
    release_weights: on the CPU engine, drop the model's torch weights once the engine has packed them (held once,
        not twice). None: when the model was loaded here (a name or path), not when a loaded Model was given.
    max_seq: the KV cache length. None: min(the model's context, 4096), grown (up to the model's context) when a
        request needs more; a number: fixed, and longer requests are refused.
    max_rows: rows in flight (AdaDecode's max_pending + 1, LayerSkip's k + 1). None: 16, grown as needed.
    max_seqs: sequences decoded at once. 1 (the default): one request at a time, in arrival order. More: requests
        from any number of threads share the engine's steps (decoding/batch.py: each step runs the rows of every
        active request together), each getting exactly the tokens it gets alone; the engine then holds max_seqs
        KV caches of max_seq positions and max_rows rows, fixed when it is built (max_seq None: min(the model's
        context, 4096)), and a request that needs more is refused; requests beyond max_seqs wait for a free one.
    """

    def __init__(self, model: str | Model = "default", *, heads=None, engine: str | EngineOptions = "auto",
                 device: str | None = None,
                 dtype: str | None = None, max_seq: int | None = None, max_rows: int | None = None,
                 threads: int | None = None, release_weights: bool | None = None, max_seqs: int = 1):
        self._release = (not isinstance(model, Model)) if release_weights is None else bool(release_weights)
        self.model = model if isinstance(model, Model) else load_model(model)
        self.tokenizer = self.model.tokenizer
        self.heads, self.heads_meta, self.heads_spec = [], {}, heads
        if heads is not None:
            from .heads import files as head_files

            loaded, meta = head_files.load_heads(heads, self.model)
            self.heads, self.heads_meta = list(loaded), dict(meta or {})
            if not self.heads:
                raise ValueError(f"heads {heads}: no heads in it")
        opts = engine if isinstance(engine, EngineOptions) else EngineOptions(engine=engine)
        given = dict(device=device, dtype=dtype, threads=threads)
        self.engine_options = opts.replace(**{k: v for k, v in given.items() if v is not None})
        if isinstance(max_seqs, bool) or not isinstance(max_seqs, int) or max_seqs < 1:
            raise BadOption(f"max_seqs must be an integer >= 1, got {max_seqs!r}", param="max_seqs")
        self.max_seqs = max_seqs
        # several sequences share one engine, which cannot grow under them: its sizes are fixed at the first use
        self._fixed_seq = max_seq is not None or max_seqs > 1
        self._fixed_rows = max_rows is not None or max_seqs > 1
        self._max_seq = max_seq if max_seq is not None else min(self.model.cfg.max_position, 4096)
        self._max_rows = max_rows if max_rows is not None else 16
        self._engine = None
        self._lock = threading.Lock()
        self._batcher = None

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def engine(self):
        """The engine (built on first use)."""
        if self._engine is None:
            with self._lock:
                self._fit(0, 0)
        return self._engine

    @property
    def max_context(self) -> int:
        """The most tokens (prompt + generated) one request may use."""
        return self._max_seq if self._fixed_seq else self.model.cfg.max_position

    def _fit(self, seq: int, rows: int) -> None:
        """(Re)build the engine so that it holds `seq` positions and `rows` rows in flight; the caller holds the lock."""
        from .engines.select import make_engine

        if self._engine is not None and seq <= self._max_seq and rows <= self._max_rows:
            return
        self._max_seq, self._max_rows = max(self._max_seq, seq), max(self._max_rows, rows)
        self._engine = None  # free the old cache first
        opts = self.engine_options if self.max_seqs == 1 else self.engine_options.replace(max_seqs=self.max_seqs)
        self._engine = make_engine(self.model, opts, max_seq=self._max_seq, max_rows=self._max_rows)
        if self._release and self._engine.name == "cpu":
            self.model.release_weights("the CPU engine's packed copy")
        if self.heads:
            self._engine.set_heads(self.heads)

    # ---- requests ------------------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | None = None, *, messages: Sequence[dict] | None = None,
               chat: bool = False) -> list[int]:
        """Token ids of a text prompt (wrapped as one user message when `chat`), of token ids, or of chat messages."""
        if (prompt is None) == (messages is None):
            raise BadOption("give either a prompt or messages", param="prompt")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        tok = self.tokenizer
        if tok is None:
            raise BadOption(f"{self.model.source} has no tokenizer.json; cannot encode a text prompt", param="prompt")
        if messages is not None:
            return tok.encode_messages(check_messages(messages))
        if not isinstance(prompt, str):
            raise BadOption(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", param="prompt")
        from .model.tokenizer import check_text

        check_text(prompt, "prompt", param="prompt")  # here, not after the chat template: the position is the caller's
        if prompt == "":
            raise BadOption("empty prompt: give at least one character", param="prompt")
        return tok.encode_chat(prompt) if chat else tok.encode(prompt)

    def decode(self, tokens: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ValueError(f"{self.model.source} has no tokenizer.json; cannot decode tokens")
        return self.tokenizer.decode(list(tokens))

    def prepare(self, prompt=None, *, messages=None, chat: bool = False, max_new_tokens: int = 128,
                method: str | None = None, stop: str | Sequence[str] | None = None, **options) -> _Request:
        """Check a request without touching the engine (a ValueError names what is wrong); `run` decodes it.

        method: a registered method (adadecode.decoding.methods: "vanilla", "adadecode", "layerskip"); default:
            adadecode where heads are loaded, else vanilla.
        stop: strings that end the text (cut before them); EOS ends it too.
        options: the methods' options, checked by the method's registration (any method's may be given; the chosen
            method's are used): gamma (adadecode: exit when a head's confidence > gamma; one number or one per head;
            default: the heads file's recommended per-head gammas or gamma), max_pending (adadecode: most early
            tokens awaiting verification, default 5), k, head_layer (layerskip: draft length, default 4, and the
            drafting head's layer, default the deepest head); and others passed to the method's function (e.g.
            the sampling options).
        """
        ids = self.encode(prompt, messages=messages, chat=chat)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise BadOption(f"max_new_tokens must be an integer, got {max_new_tokens!r}", param="max_new_tokens")
        check_request(types.SimpleNamespace(cfg=self.model.cfg, max_seq=self.max_context), ids, max_new_tokens)
        m = methods.get(method or ("adadecode" if self.heads else "vanilla"))
        stop = check_stop(stop)
        if stop and self.tokenizer is None:
            raise BadOption(f"{self.model.source} has no tokenizer.json; stop strings need one", param="stop")
        registered = methods.options()
        given = {k: options.pop(k) for k in list(options) if k in registered}
        reserved = methods.reserved()
        bad = [o for o in options if not m.takes(o) or o in reserved]
        if bad:
            raise BadOption(f"{m.name} decoding takes no option {bad[0]!r} in this build", param=bad[0])
        kwargs, info = dict(options), {}
        sampling = {k: options[k] for k in ("temperature", "top_k", "top_p", "seed") if k in options}
        if make_sampling(**sampling) is not None:  # checks the values now, before the request waits for the engine
            info["sampling"] = sampling
        if m.needs_heads:
            if not self.heads:
                raise BadOption(f"method {m.name!r} needs intermediate heads: load the LLM with heads=...",
                                param="method")
            info = {"heads": self.heads_spec, "head_layers": [h.layer for h in self.heads]}  # (not the sampling)
        ctx = methods.Context(tuple(self.heads), self.heads_meta)
        values = m.checked(given, ctx)
        rows = m.rows(values)
        if self._fixed_rows and rows > self._max_rows:
            name = m.rows_option(values) if callable(m.rows_option) else m.rows_option
            raise BadOption(f"{name}={values[name]} needs {rows} rows in flight; this LLM holds max_rows={self._max_rows}",
                            param=name)
        call, reported = m.bind(values, ctx)
        kwargs.update(call)
        info.update(reported)
        return _Request(prompt=ids, max_new_tokens=max_new_tokens, method=m.name, kwargs=kwargs, options=info,
                        stop=stop, rows=rows)

    def run(self, req: _Request, *, on_text: Callable[[Delta], None] | None = None,
            cancel: threading.Event | None = None) -> Completion:
        """Decode a prepared request on the engine. `on_text` gets each Delta as soon as its text is final (the last
        one carries the Completion); `cancel` set -> Cancelled after the current token. With max_seqs > 1 the
        request joins the requests in flight (its steps are theirs); else callers take the engine one at a time."""
        if self.max_seqs > 1:
            return self._batched().run(req, on_text, cancel)
        with self._lock:
            if cancel is not None and cancel.is_set():
                raise Cancelled(0)
            self._fit(len(req.prompt) + req.max_new_tokens, req.rows)
            r = _Run(self, req, on_text, cancel)
            try:
                gen = methods.get(req.method).function(self._engine, req.prompt, req.max_new_tokens,
                                                       eos_ids=self.model.eos_ids, on_token=r.on_token_arg,
                                                       **req.kwargs)
            except _StopStringHit:
                gen = None
        return r.finish(gen)

    def _batched(self) -> "_Batcher":
        with self._lock:
            if self._batcher is None:
                self._fit(0, 0)
                self._batcher = _Batcher(self)
            return self._batcher

    def close(self) -> None:
        """Stop the batching thread (max_seqs > 1), cancelling what is in flight; the LLM can be used again."""
        b, self._batcher = self._batcher, None
        if b is not None:
            b.stop()

    # ---- the two entry points ------------------------------------------------------------------------------------
    def generate(self, prompt=None, *, messages=None, on_text: Callable[[Delta], None] | None = None,
                 cancel: threading.Event | None = None, **kwargs) -> Completion:
        """Decode `prompt` (text, or token ids) or chat `messages` to the end: EOS, a stop string or max_new_tokens.

        Keyword arguments: those of `prepare` (chat, max_new_tokens, method, stop, the methods' options: gamma,
        max_pending, k, head_layer, and the sampling options), plus `on_text` and `cancel` (see `run`)."""
        return self.run(self.prepare(prompt, messages=messages, **kwargs), on_text=on_text, cancel=cancel)

    def stream(self, prompt=None, *, messages=None, **kwargs) -> Iterator[Delta]:
        """Like `generate`, as an iterator of Deltas (text pieces; the last one carries the Completion).

        The request is checked at once; decoding runs on a worker thread. Closing the iterator early (break)
        cancels the generation and waits for the engine to be free."""
        import queue

        req = self.prepare(prompt, messages=messages, **kwargs)
        return self._stream(req, queue.Queue())

    def _stream(self, req: _Request, q) -> Iterator[Delta]:
        cancel = threading.Event()

        def work():
            try:
                self.run(req, on_text=q.put, cancel=cancel)
            except BaseException as e:  # noqa: BLE001 (handed to the consumer)
                q.put(e)

        worker = threading.Thread(target=work, name="adadecode-generate", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.completion is not None:
                    return
        finally:
            cancel.set()
            worker.join()
