"""The data heads learn from (DESIGN.md §5): the model's own greedy continuations, with, at every continuation
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

from .config import LlamaConfig
from .torch_engine import rms_norm, rope_inv_freq, rotate_half
from .weights import LlamaWeights


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
                     progress=None) -> tuple[list[list[int]], Captured | None]:
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
                tp, ti = torch.softmax(lg, -1).topk(min(TOPK, lg.shape[-1]), dim=-1)
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
        tmp = cache_file + ".tmp"
        torch.save(data, tmp)
        os.replace(tmp, cache_file)
    return data
