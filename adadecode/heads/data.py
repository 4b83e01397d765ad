"""The data heads learn from (docs/design.md#heads): the model's own greedy continuations, with, at every continuation
position, the final-normed hidden state at candidate layers and the final-layer distribution (top entries).

* `BatchedForward` / `generate_batched`: a batched, left-padded forward with a KV cache (torch, CPU or GPU) that
  generates and captures in the same pass.
* `make_data`: one generate + capture over a prompt list, kept in one file (small sets, tests).
* `ShardCache`: the same at scale: prompts in length order, one safetensors shard per batch, resumable, read
  back by layer (see its docstring for the layout).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from ..model.math import rms_norm, rope_inv_freq, rotate_half
from ..model.config import LlamaConfig
from ..model.weights import LlamaWeights


class BatchedForward:
    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights, device="cpu", dtype=torch.float32):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.w = weights.to(device=self.device, dtype=dtype)
        self.inv_freq = rope_inv_freq(cfg).to(self.device)

    def _rope(self, pos: torch.Tensor):
        freqs = pos.float()[..., None] * self.inv_freq  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, :, None, :], emb.sin().to(self.dtype)[:, :, None, :]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, key_ok: torch.Tensor, cache: list | None, c0: int,
                capture_layers: Sequence[int] = (), logits: bool | str = True):
        """tokens/pos [B, S] at cache columns c0..c0+S-1; key_ok [B, c0+S] (False at padding columns).

        cache: per layer [K, V] tensors [B, C, n_kv, hd] written in place at c0.. (None: no cache, S = all).
        Returns (logits [B, S, V] fp32 ([B, 1, V] with logits="last"; None with logits=False), {layer: final-normed hidden [B, S, d] fp32} for capture_layers,
        final-normed last hidden [B, S, d] fp32).
        """
        cfg = self.cfg
        B, S = tokens.shape
        h = self.w.embed[tokens]
        cos, sin = self._rope(pos)
        cols = torch.arange(c0 + S, device=self.device)
        causal = cols[None, :] <= (c0 + torch.arange(S, device=self.device))[:, None]  # [S, C]
        mask = causal[None, None] & key_ok[:, None, None, :]  # [B, 1, S, C]
        caps = {}
        rep = cfg.n_heads // cfg.n_kv_heads
        for li, lw in enumerate(self.w.layers):
            if li in capture_layers:
                caps[li] = rms_norm(h, self.w.norm, cfg.rms_norm_eps).float()
            x = rms_norm(h, lw.attn_norm, cfg.rms_norm_eps)
            q = (x @ lw.wq.T).view(B, S, cfg.n_heads, cfg.head_dim)
            k = (x @ lw.wk.T).view(B, S, cfg.n_kv_heads, cfg.head_dim)
            v = (x @ lw.wv.T).view(B, S, cfg.n_kv_heads, cfg.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if cache is not None:
                cache[li][0][:, c0:c0 + S] = k
                cache[li][1][:, c0:c0 + S] = v
                k, v = cache[li][0][:, :c0 + S], cache[li][1][:, :c0 + S]
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
            h = h + attn.transpose(1, 2).reshape(B, S, -1) @ lw.wo.T
            x = rms_norm(h, lw.mlp_norm, cfg.rms_norm_eps)
            h = h + (F.silu(x @ lw.w_gate.T) * (x @ lw.w_up.T)) @ lw.w_down.T
        if cfg.n_layers in capture_layers:
            caps[cfg.n_layers] = rms_norm(h, self.w.norm, cfg.rms_norm_eps).float()
        xf = rms_norm(h, self.w.norm, cfg.rms_norm_eps)
        if logits == "last":
            out = (xf[:, -1:] @ self.w.lm_head.T).float()
        else:
            out = (xf @ self.w.lm_head.T).float() if logits else None
        return out, caps, xf.float()


def _left_pad(seqs: list[list[int]], pad: int, device):
    n = max(len(s) for s in seqs)
    toks = torch.full((len(seqs), n), pad, dtype=torch.long)
    ok = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        toks[i, n - len(s):] = torch.tensor(s)
        ok[i, n - len(s):] = True
    pos = (ok.long().cumsum(1) - 1).clamp(min=0)
    return toks.to(device), pos.to(device), ok.to(device)


TOPK = 256  # the final distribution is kept as its top-256 entries; the mass beyond them is the "tail"


@dataclasses.dataclass
class Captured:
    """What the heads learn from: one row per continuation position but the last (the row holding generated
    token t, which predicts token t+1; the first token comes from prefill and is not a head's job)."""
    layers: list[int]
    x: dict  # layer -> [N, d] fp16: RMSNorm_final(h after `layer` decoder layers)
    y: torch.Tensor  # [N] int64 final-layer greedy token (argmax over the full vocabulary)
    top_p: torch.Tensor  # [N, TOPK] fp16 final-layer probabilities, descending
    top_i: torch.Tensor  # [N, TOPK] int64 their token ids
    seq: torch.Tensor  # [N] int64 the prompt each row comes from
    step: torch.Tensor  # [N] int64 index of the fed token inside its continuation (0 = first generated token)

    def select(self, rows: torch.Tensor) -> "Captured":
        return Captured(layers=self.layers, x={l: v[rows] for l, v in self.x.items()}, y=self.y[rows],
                        top_p=self.top_p[rows], top_i=self.top_i[rows], seq=self.seq[rows], step=self.step[rows])


@torch.no_grad()
def generate_batched(fwd: BatchedForward, prompts: list[list[int]], max_new_tokens: int,
                     eos_ids: Sequence[int] = (), batch_size: int = 16, capture_layers: Sequence[int] = (),
                     progress=None, topk: int = TOPK) -> tuple[list[list[int]], Captured | None]:
    """Greedy continuations (EOS included when it ends one, as in generate_vanilla), batched with a KV cache.

    With capture_layers, the same forward is the teacher-forced capture: each decode step feeds the model its
    own previous token, exactly the forward a teacher-forced pass over prompt + continuation computes at that
    position, so the hidden states at those layers and the final distribution are recorded on the way
    (no second pass over the data).
    """
    eos_set = set(int(e) for e in eos_ids)
    eos = torch.tensor(sorted(eos_set) or [-1], device=fwd.device)
    layers = sorted(set(int(l) for l in capture_layers))
    out: list[list[int]] = [None] * len(prompts)
    rec = {"x": {l: [] for l in layers}, "y": [], "top_p": [], "top_i": [], "seq": [], "step": []}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    cfg = fwd.cfg
    # The chat template's system prompt is a prefix shared by every prompt: its K/V are computed once.
    # Cache columns: [shared prefix | left padding | rest of the prompt | generated tokens].
    n0 = min(len(p) for p in prompts) - 1
    n_pre = next((j for j in range(n0) if len({p[j] for p in prompts}) > 1), n0)
    pre_kv = None
    if n_pre > 0:
        pre_kv = [[torch.zeros((1, n_pre, cfg.n_kv_heads, cfg.head_dim), device=fwd.device, dtype=fwd.dtype)
                   for _ in range(2)] for _ in range(cfg.n_layers)]
        pre = torch.tensor([prompts[0][:n_pre]], device=fwd.device)
        fwd.forward(pre, torch.arange(n_pre, device=fwd.device)[None], torch.ones_like(pre, dtype=torch.bool), pre_kv, 0,
                    logits=False)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        toks, pos, ok = _left_pad([prompts[i][n_pre:] for i in idx], 0, fwd.device)
        B, P = toks.shape
        P += n_pre
        pos = pos + n_pre
        shape = (B, P + max_new_tokens, cfg.n_kv_heads, cfg.head_dim)
        cache = [[torch.zeros(shape, device=fwd.device, dtype=fwd.dtype) for _ in range(2)] for _ in range(cfg.n_layers)]
        if pre_kv is not None:
            for layer in range(cfg.n_layers):
                for j in range(2):
                    cache[layer][j][:, :n_pre] = pre_kv[layer][j]
        ones = (lambda n: torch.ones((B, n), dtype=torch.bool, device=fwd.device))
        key_ok = torch.cat([ones(n_pre), ok, ones(max_new_tokens)], 1)
        logits, _, _ = fwd.forward(toks, pos, key_ok[:, :P], cache, n_pre, logits="last")
        nxt = logits[:, -1].argmax(-1)
        gen, steps = [nxt], []
        done = torch.isin(nxt, eos)
        cur_pos = pos[:, -1]
        for step in range(1, max_new_tokens):
            if bool(done.all()):
                break
            cur_pos = cur_pos + 1
            logits, caps, _ = fwd.forward(nxt[:, None], cur_pos[:, None], key_ok[:, :P + step], cache, P + step - 1,
                                          capture_layers=layers)
            lg = logits[:, -1]
            nxt = lg.argmax(-1)
            if layers:
                tp, ti = torch.softmax(lg, -1).topk(min(topk, lg.shape[-1]), dim=-1)
                steps.append(({l: caps[l][:, -1].half().cpu() for l in layers}, nxt.cpu(), tp.half().cpu(), ti.cpu(),
                              ~done.cpu()))
            gen.append(nxt)
            done = done | torch.isin(nxt, eos)
        gen = torch.stack(gen, 1).tolist()
        for row, i in zip(gen, idx):
            cut = next((j + 1 for j, t in enumerate(row) if t in eos_set), len(row))
            out[i] = row[:cut]
        for s, (cx, y, tp, ti, alive) in enumerate(steps):  # step s+1 fed token s, predicted token s+1
            for r, i in enumerate(idx):
                if alive[r] and s + 1 < len(out[i]):
                    for l in layers:
                        rec["x"][l].append(cx[l][r])
                    rec["y"].append(y[r]); rec["top_p"].append(tp[r]); rec["top_i"].append(ti[r])
                    rec["seq"].append(i); rec["step"].append(s)
        if progress is not None:
            progress.update(len(idx))
    if not layers:
        return out, None
    st = (lambda v: torch.stack(v) if v else torch.zeros(0))
    cap = Captured(layers=layers, x={l: st(v) for l, v in rec["x"].items()}, y=st(rec["y"]).long(),
                   top_p=st(rec["top_p"]), top_i=st(rec["top_i"]).long(), seq=torch.tensor(rec["seq"], dtype=torch.long),
                   step=torch.tensor(rec["step"], dtype=torch.long))
    # keep rows in (prompt, step) order: the simulator walks each prompt's continuation in order
    key = cap.seq * (max_new_tokens + 1) + cap.step
    return out, cap.select(torch.argsort(key))


# ---------------------------------------------------------------------------------------------------------------
# Data: generate + capture, cached on disk so that training can be rerun without regenerating.
# ---------------------------------------------------------------------------------------------------------------
def make_data(model, prompt_texts: list[str], layers: Sequence[int], max_new_tokens: int, chat: bool = True,
              batch_size: int = 64, device: str | None = None, dtype: torch.dtype = torch.float32,
              cache_file: str | None = None, log=print) -> dict:
    """Generate + capture for `prompt_texts` (or reuse `cache_file` when it matches model, prompts and settings)."""
    import os

    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.source}: no tokenizer; train-heads needs one to encode text prompts")
    prompts = [tok.encode_chat(t) if chat else tok.encode(t) for t in prompt_texts]
    key = {"fingerprint": model.fingerprint, "prompts": prompts, "layers": sorted(set(layers)),
           "max_new_tokens": max_new_tokens}
    if cache_file and os.path.isfile(cache_file):
        data = torch.load(cache_file, weights_only=False)
        k2 = data.get("key", {})
        if {**k2, "layers": key["layers"]} == key and set(key["layers"]) <= set(k2.get("layers", [])):
            log(f"reusing generated data from {cache_file} ({data['seconds']:.0f} s to make)")
            return data
        log(f"{cache_file} was made for other prompts/settings: regenerating")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fwd = BatchedForward(model.cfg, model.weights, device=device, dtype=dtype)
    t0 = time.time()
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="generate+capture", unit="prompt")
    except ImportError:
        bar = None
    conts, cap = generate_batched(fwd, prompts, max_new_tokens, model.eos_ids, batch_size=batch_size,
                                  capture_layers=layers, progress=bar)
    if bar is not None:
        bar.close()
    data = {"key": key, "texts": list(prompt_texts), "prompts": prompts, "conts": conts, "cap": cap,
            "seconds": time.time() - t0, "device": str(fwd.device), "dtype": str(dtype)}
    if cache_file:
        from ..model.filesys import atomic_path

        with atomic_path(cache_file) as tmp:
            torch.save(data, tmp)
    return data


# ---------------------------------------------------------------------------------------------------------------
# The data cache at scale: sharded, resumable
# ---------------------------------------------------------------------------------------------------------------
class ShardCache:
    """Generated + captured data for one prompt list, in a directory (never in the repository):

        manifest.json            what the shards were made with (model fingerprint, layers, max_new_tokens, topk,
                                 prompt count and hash, batch); a mismatch is an error naming the field
        prompts.json             the prompts (dicts, see heads.prompts) with their token ids
        shard-00000.safetensors  one generation batch: x.{layer} [n, d] fp16, y [n] int32, top_p [n, topk] fp16,
                                 top_i [n, topk] int32, seq [n] int32 (prompt index), step [n] int32; metadata
                                 'conts' (JSON: {prompt index: continuation}), 'seconds', 'new_tokens'

    Prompts are processed in token-length order, `batch` per shard, so a shard's rows share a similar length
    and an interrupted build resumes at the first missing shard (each shard is written to a temporary name and
    renamed). Rows are one per continuation token but the last, as in generate_batched.
    """

    def __init__(self, root, model, layers: Sequence[int], max_new_tokens: int, topk: int = 64, batch: int = 32):
        from pathlib import Path
        self.root, self.model = Path(root), model
        self.layers = sorted(set(int(l) for l in layers))
        self.max_new_tokens, self.topk, self.batch = max_new_tokens, topk, batch

    def _manifest(self, prompts: list[dict]) -> dict:
        import hashlib
        import json
        h = hashlib.sha256(json.dumps([p["ids"] for p in prompts]).encode()).hexdigest()[:16]
        return {"fingerprint": self.model.fingerprint, "layers": self.layers, "max_new_tokens": self.max_new_tokens,
                "topk": self.topk, "batch": self.batch, "n_prompts": len(prompts), "prompts_sha256": h}

    def shards(self, n_prompts: int) -> list[tuple[str, list[int]]]:
        import json
        prompts = json.loads((self.root / "prompts.json").read_text())
        order = sorted(range(n_prompts), key=lambda i: (len(prompts[i]["ids"]), i))
        return [(f"shard-{k // self.batch:05d}.safetensors", order[k:k + self.batch]) for k in range(0, n_prompts, self.batch)]

    def build(self, prompts: list[dict], *, device: str = "cpu", dtype=torch.float32, log=print) -> dict:
        """Generate the missing shards for `prompts` (each with 'ids'). Returns {'tokens', 'seconds', 'tokens_per_s'}
        over the shards made by this call."""
        import json

        from safetensors.torch import save_file

        from ..model.filesys import atomic_path, write_atomic

        if not prompts or any("ids" not in p or not p["ids"] for p in prompts):
            raise ValueError(f"{self.root}: every prompt needs non-empty token ids ('ids')")
        self.root.mkdir(parents=True, exist_ok=True)
        man = self._manifest(prompts)
        mpath = self.root / "manifest.json"
        if mpath.is_file():
            old = json.loads(mpath.read_text())
            bad = [k for k in man if old.get(k) != man[k]]
            if bad:
                raise ValueError(f"{mpath}: made with other settings ({', '.join(f'{k}: {old.get(k)!r} here, {man[k]!r} asked' for k in bad)}); "
                                 f"use another directory")
        else:
            write_atomic(self.root / "prompts.json", json.dumps(prompts))
            write_atomic(mpath, json.dumps(man, indent=1))  # last: a manifest means its prompts are complete
        fwd = BatchedForward(self.model.cfg, self.model.weights, device=device, dtype=dtype)
        todo = [(name, idx) for name, idx in self.shards(len(prompts)) if not (self.root / name).is_file()]
        n_shards = -(-len(prompts) // self.batch)
        log(f"{self.root}: {n_shards - len(todo)} of {n_shards} shards present, {len(todo)} to make")
        made_tokens, t_all = 0, time.time()
        for name, idx in todo:
            t0 = time.time()
            conts, cap = generate_batched(fwd, [prompts[i]["ids"] for i in idx], self.max_new_tokens, self.model.eos_ids,
                                          batch_size=len(idx), capture_layers=self.layers, topk=self.topk)
            dt = time.time() - t0
            new = sum(len(c) for c in conts)
            made_tokens += new
            tensors = {f"x.{l}": cap.x[l].half().contiguous() for l in self.layers}
            g = torch.tensor(idx, dtype=torch.int32)
            tensors.update(y=cap.y.int(), top_p=cap.top_p.half().contiguous(), top_i=cap.top_i.int().contiguous(),
                           seq=g[cap.seq].contiguous(), step=cap.step.int())
            md = {"conts": json.dumps({str(i): c for i, c in zip(idx, conts)}), "seconds": f"{dt:.3f}", "new_tokens": str(new)}
            with atomic_path(self.root / name) as tmp:
                save_file(tensors, str(tmp), metadata=md)
            log(f"{name}: {len(idx)} prompts, {new} new tokens, {cap.y.numel()} rows in {dt:.1f} s "
                f"({new / dt:.1f} tokens/s)")
        dt = time.time() - t_all
        return {"tokens": made_tokens, "seconds": dt, "tokens_per_s": made_tokens / dt if dt > 0 else 0.0}

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.glob("*") if f.is_file())

    def load(self, layers: Sequence[int] | None = None) -> dict:
        """{'prompts', 'conts', 'cap'} from the shards present (rows in (prompt, step) order); `layers` (default:
        all captured) picks which hidden states are read."""
        import json

        from safetensors import safe_open

        man = json.loads((self.root / "manifest.json").read_text())
        layers = man["layers"] if layers is None else sorted(set(layers))
        missing = sorted(set(layers) - set(man["layers"]))
        if missing:
            raise ValueError(f"{self.root}: no hidden states at layers {missing} (captured: {man['layers']})")
        prompts = json.loads((self.root / "prompts.json").read_text())
        conts: list = [None] * len(prompts)
        parts = {k: [] for k in ["y", "top_p", "top_i", "seq", "step"] + [f"x.{l}" for l in layers]}
        seconds = 0.0
        for f in sorted(self.root.glob("shard-*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                seconds += float(sf.metadata()["seconds"])
                for i, c in json.loads(sf.metadata()["conts"]).items():
                    conts[int(i)] = c
                for k in parts:
                    parts[k].append(sf.get_tensor(k))
        if not parts["y"]:
            raise ValueError(f"{self.root}: no shards yet (run the build first)")
        cat = {k: torch.cat(v) for k, v in parts.items()}
        cap = Captured(layers=list(layers), x={l: cat[f"x.{l}"] for l in layers}, y=cat["y"].long(), top_p=cat["top_p"],
                       top_i=cat["top_i"].long(), seq=cat["seq"].long(), step=cat["step"].long())
        key = cap.seq * (man["max_new_tokens"] + 1) + cap.step
        return {"prompts": prompts, "conts": conts, "cap": cap.select(torch.argsort(key)), "manifest": man,
                "key": {"max_new_tokens": man["max_new_tokens"]}, "seconds": seconds}


def merge_data(parts: list[dict]) -> dict:
    """One data dict from several (ShardCache.load results): prompts and rows concatenated, prompt indices shifted."""
    prompts, conts, caps, seconds, off = [], [], [], 0.0, 0
    for d in parts:
        c = d["cap"]
        caps.append(Captured(layers=c.layers, x=c.x, y=c.y, top_p=c.top_p, top_i=c.top_i, seq=c.seq + off, step=c.step))
        prompts += d["prompts"]
        conts += d["conts"]
        seconds += d.get("seconds", 0.0)
        off += len(d["prompts"])
    layers = caps[0].layers
    cap = Captured(layers=layers, x={l: torch.cat([c.x[l] for c in caps]) for l in layers}, y=torch.cat([c.y for c in caps]),
                   top_p=torch.cat([c.top_p for c in caps]), top_i=torch.cat([c.top_i for c in caps]),
                   seq=torch.cat([c.seq for c in caps]), step=torch.cat([c.step for c in caps]))
    return {"prompts": prompts, "conts": conts, "cap": cap, "seconds": seconds,
            "key": {"max_new_tokens": max(d["key"]["max_new_tokens"] for d in parts)}, "device": "cpu", "dtype": "torch.float32"}
