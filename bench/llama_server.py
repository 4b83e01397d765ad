"""llama.cpp's server as a benchmark peer (built by `make bench-peers` into .peers/; never part of `make test`).

    with LlamaServer(gguf, threads=2, lookup=True) as srv:
        tokens, ms_per_token = srv.complete(prompt_ids, n_predict=64)

One server process per configuration, on a loopback port: plain greedy decoding, or llama.cpp's n-gram lookup
speculation (`--spec-type ngram-simple`: the tokens after the latest earlier match of the last `ngram` tokens, up to
`draft` of them, verified by the model), with `parallel` slots (continuous batching across requests). Greedy: top-k 1,
no prompt cache, the prompt given as token ids, the generated ids returned (`return_tokens`) with the server's own
timing of the generated tokens (`timings.predicted_per_token_ms`).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("PEERS", ROOT / ".peers"))


def server_binary() -> Path | None:
    exe = PEERS / "llama-server"
    return exe if exe.exists() else None


def peer_gguf(kind: str = "BF16") -> Path | None:
    f = PEERS / f"smollm2-{kind}.gguf"
    return f if f.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, gguf: Path, *, threads: int, lookup: bool = False, ngram: int = 3, draft: int = 8,
                 parallel: int = 1, ctx: int = 4096):
        exe = server_binary()
        if exe is None:
            raise RuntimeError(f"no llama-server under {PEERS}: run `make bench-peers`")
        self.port = _free_port()
        self.cmd = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                    "-tb", str(threads), "-c", str(ctx * parallel), "-np", str(parallel), "--no-webui",
                    "--temp", "0", "--top-k", "1", "-ngl", "0"]
        if lookup:
            self.cmd += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(ngram),
                         "--spec-ngram-simple-size-m", str(draft)]
        self.lookup, self.proc = lookup, None

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("llama-server did not become healthy in 60 s")

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def complete(self, prompt: list[int], n_predict: int) -> tuple[list[int], float, dict]:
        """(generated ids, ms per generated token after the first, the server's timings) of one greedy request."""
        body = {"prompt": list(prompt), "n_predict": n_predict, "temperature": 0, "top_k": 1, "cache_prompt": False,
                "return_tokens": True, "stream": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        timings = out.get("timings", {})
        return list(out.get("tokens", [])), float(timings.get("predicted_per_token_ms", float("nan"))), timings
