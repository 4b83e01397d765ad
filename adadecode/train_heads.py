"""Training intermediate heads (DESIGN.md §5) and choosing where to put them.

Pipeline (`python -m adadecode train-heads`, or `train_pipeline()`):

1. **Generate** the model's own greedy continuations of a prompt set (`generate_batched`: a batched,
   left-padded forward with a KV cache on torch, GPU where there is one). Prompts are split into a
   training part and a held-out part *by prompt*.
2. **Vocabulary** (restricted heads): the K most frequent tokens of the training continuations.
3. **Capture** (`capture`): one teacher-forced batched forward over prompt + continuation per prompt,
   keeping, at every continuation position (the rows the heads see at decode time), the final-normed
   hidden state at each candidate layer, and the final-layer distribution collapsed onto the K
   tokens + "rest" (restricted) or the final-normed last hidden state (full vocabulary; the target is then
   recomputed per minibatch), and the final greedy token.
4. **Train** each head by forward KL(p_final || p_head), T initialised to the identity, Adam, the
   base model frozen (`train_head`).
5. **Evaluate** on the held-out prompts: per head and gamma, exit rate and accuracy of early tokens
   (`evaluate_head`), then simulate AdaDecode's schedule (`simulate`) over layer sets and gammas and
   recommend the pair with the highest ideal layer-step speedup (`recommend`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import LlamaConfig
from .heads import Head
from .torch_engine import rms_norm, rope_inv_freq, rotate_half
from .weights import LlamaWeights

GAMMAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


# ---------------------------------------------------------------------------------------------------------------
# Batched reference forward (left-padded rows, KV cache). Not batch-invariant: it makes training data, it is
# not a decoding engine. Greedy tokens match TorchEngine's up to floating-point near-ties.
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary, targets, training, evaluation
# ---------------------------------------------------------------------------------------------------------------
def build_vocab(conts: list[list[int]], k: int, vocab_size: int) -> torch.Tensor | None:
    """The k most frequent tokens of the continuations (ascending ids); None (full vocabulary) when k <= 0
    or k >= vocab_size. Ties in frequency go to the lower id, so the choice is deterministic."""
    if k <= 0 or k >= vocab_size:
        return None
    counts = Counter(t for c in conts for t in c)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:k]
    return torch.tensor(sorted(ranked), dtype=torch.long)


def collapse_target(top_p: torch.Tensor, top_i: torch.Tensor, vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Final-layer distribution on the head's outputs [N, K+1]: the K tokens and "rest" (everything else,
    including the tail beyond the stored top entries)."""
    K = vocab.numel()
    col = torch.full((vocab_size,), K, dtype=torch.long)
    col[vocab] = torch.arange(K)
    p = top_p.float()
    tgt = torch.zeros(p.shape[0], K + 1).scatter_add_(1, col[top_i], p)
    tgt[:, K] += (1 - p.sum(1)).clamp(min=0)
    return tgt


def _head_logits(x: torch.Tensor, T: torch.Tensor, E: torch.Tensor, w_rest: torch.Tensor | None) -> torch.Tensor:
    z = x @ T.T
    lg = z @ E.T
    return lg if w_rest is None else torch.cat([lg, (z @ w_rest)[:, None]], -1)


def _kl_rows(logits: torch.Tensor, tgt: torch.Tensor | None, top_p=None, top_i=None) -> torch.Tensor:
    """Per-row KL(p_final || p_head). Restricted: tgt [R, K+1]. Full vocabulary: the target is the stored
    top entries plus a tail bucket (the head's mass outside them)."""
    logq = torch.log_softmax(logits, -1)
    if tgt is not None:
        return (tgt * (torch.log(tgt.clamp(min=1e-30)) - logq)).sum(-1)
    p = top_p.float()
    tail = (1 - p.sum(1)).clamp(min=0)
    lq_top = logq.gather(1, top_i)
    lq_tail = torch.log((1 - lq_top.exp().sum(1)).clamp(min=1e-30))
    return (p * (torch.log(p.clamp(min=1e-30)) - lq_top)).sum(1) + tail * (torch.log(tail.clamp(min=1e-30)) - lq_tail)


class HeadData:
    """Rows of one split for one layer, with the targets the loss needs."""

    def __init__(self, cap: Captured, layer: int, vocab: torch.Tensor | None, vocab_size: int):
        self.x = cap.x[layer]
        self.y, self.top_p, self.top_i = cap.y, cap.top_p, cap.top_i
        self.tgt = None if vocab is None else collapse_target(cap.top_p, cap.top_i, vocab, vocab_size).half()

    def __len__(self):
        return self.x.shape[0]

    def batch(self, rows):
        tgt = None if self.tgt is None else self.tgt[rows].float()
        return self.x[rows].float(), tgt, self.top_p[rows], self.top_i[rows]


def _lm_rows(lm_head: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
    return (lm_head if vocab is None else lm_head[vocab]).float()


@torch.no_grad()
def heldout_kl(head: Head, data: HeadData, lm_head: torch.Tensor, batch: int = 2048) -> float:
    E = _lm_rows(lm_head, head.vocab)
    tot = 0.0
    for b0 in range(0, len(data), batch):
        x, tgt, tp, ti = data.batch(slice(b0, b0 + batch))
        tot += float(_kl_rows(_head_logits(x, head.T.float(), E, head.w_rest), tgt, tp, ti).sum())
    return tot / max(1, len(data))


def train_head(layer: int, train: HeadData, lm_head: torch.Tensor, vocab: torch.Tensor | None, *, epochs: int = 4,
               lr: float = 1e-3, batch: int = 256, seed: int = 0, heldout: HeadData | None = None, log=None,
               progress_desc: str | None = None) -> tuple[Head, list[dict]]:
    """Forward KL from the final layer to the head, T from the identity, Adam with a cosine schedule.
    The base model is frozen (only T and w_rest are parameters). Returns (head, per-epoch history)."""
    d = train.x.shape[1]
    g = torch.Generator().manual_seed(seed)
    E = _lm_rows(lm_head, vocab)
    T = torch.nn.Parameter(torch.eye(d))
    w_rest = None if vocab is None else torch.nn.Parameter(torch.zeros(d))
    params = [T] + ([w_rest] if w_rest is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    n = len(train)
    steps_per_epoch = math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, epochs * steps_per_epoch)))))
    hist = []
    bar = None
    if progress_desc:
        try:
            from tqdm import tqdm
            bar = tqdm(total=epochs * steps_per_epoch, desc=progress_desc, unit="step", leave=False)
        except ImportError:
            bar = None

    def snapshot():
        return Head(layer=layer, T=T.detach().clone(), vocab=vocab, w_rest=None if w_rest is None else w_rest.detach().clone())

    if heldout is not None:
        hist.append({"epoch": 0, "heldout_kl": heldout_kl(snapshot(), heldout, lm_head)})
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for b0 in range(0, n, batch):
            rows = perm[b0:b0 + batch]
            x, tgt, tp, ti = train.batch(rows)
            loss = _kl_rows(_head_logits(x, T, E, w_rest), tgt, tp, ti).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(rows)
            if bar is not None:
                bar.update(1)
        rec = {"epoch": ep + 1, "train_kl": tot / n}
        if heldout is not None:
            rec["heldout_kl"] = heldout_kl(snapshot(), heldout, lm_head)
        hist.append(rec)
        if log:
            log(f"  layer {layer} epoch {ep + 1}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "epoch"))
    if bar is not None:
        bar.close()
    return snapshot(), hist


def round_like_file(head: Head) -> Head:
    """The head as a head file stores it (T in fp16)."""
    return Head(layer=head.layer, T=head.T.half().float(), vocab=head.vocab, w_rest=head.w_rest)


@torch.no_grad()
def head_predictions(head: Head, x: torch.Tensor, lm_head: torch.Tensor, batch: int = 2048):
    """(token [N], confidence [N]) exactly as TorchEngine.head picks them: argmax over the real tokens,
    confidence = its probability under the softmax over the head's outputs (rest included)."""
    toks, confs = [], []
    lm = lm_head.float()
    h = head.to(dtype=torch.float32)
    for b0 in range(0, x.shape[0], batch):
        p, ids = h.probs(x[b0:b0 + batch].float(), lm)
        c, i = p[:, :ids.numel()].max(-1)
        toks.append(ids[i])
        confs.append(c)
    return torch.cat(toks), torch.cat(confs)


def exit_table(conf: torch.Tensor, correct: torch.Tensor, gammas=GAMMAS) -> list[dict]:
    out = []
    for g in gammas:
        ex = conf > g
        n_ex = int(ex.sum())
        out.append({"gamma": g, "exit_rate": n_ex / max(1, conf.numel()),
                    "accuracy": float(correct[ex].float().mean()) if n_ex else None,
                    "exits": n_ex, "tokens": conf.numel()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The schedule simulator
# ---------------------------------------------------------------------------------------------------------------
def simulate(conf: torch.Tensor, correct: torch.Tensor, layers: Sequence[int], gamma: float, n_layers: int,
             max_pending: int = 5) -> dict:
    """Layer steps of AdaDecode on one continuation, from per-row head traces.

    conf, correct: [R, H] for the rows holding generated tokens 0..R-1 (row r predicts token r+1), heads in
    `layers` order (ascending). One layer step = one launch of one decoder layer, whatever the number of rows.

    Rules (DESIGN.md §1, §3): the frontier row runs from layer 0; at each head layer, if the head is confident
    (conf > gamma) and fewer than `max_pending` rows are pending, the early token is emitted: the row becomes
    pending at that depth and the next row starts at layer 0 (cost so far: the exit layer). A pending row only
    advances together with a later frontier row, in the same launch, so it costs no extra steps. A frontier that
    exits nowhere runs all L layers (cost L) and carries every pending row to L: their early tokens are
    verified. A wrong early token is found then; it and everything after it is rolled back, the final layer's
    token replaces it, and decoding resumes from the next row.
    Rows fed after a wrong early token (garbage) are not in the trace: we assume they exit like the correct row
    at the same position would (same confidences). At the end, pending rows are flushed to layer L
    (cost L - the shallowest pending depth). Vanilla: L steps per row.
    """
    R = conf.shape[0]
    L = n_layers
    conf_ok = (conf > gamma).tolist()
    corr = correct.tolist()
    H = len(layers)

    def first_exit(r, n_pending):
        if r >= R or n_pending >= max_pending:
            return None
        for j in range(H):
            if conf_ok[r][j]:
                return j
        return None

    steps = evals = exits = wrong = 0
    pending_depths: list[int] = []
    r = 0
    while r < R:
        j = first_exit(r, len(pending_depths))
        evals += H if j is None else j + 1
        if j is None:
            steps += L
            pending_depths = []
            r += 1
            continue
        steps += layers[j]
        exits += 1
        if corr[r][j]:
            pending_depths.append(layers[j])
            r += 1
            continue
        # wrong early token at row r: garbage rows r+1.. run until some frontier reaches L
        wrong += 1
        n_pend = len(pending_depths) + 1
        q = r + 1
        while True:
            jq = first_exit(q, n_pend)
            evals += H if jq is None else jq + 1
            if jq is None:
                steps += L
                break
            steps += layers[jq]
            n_pend += 1
            q += 1
        pending_depths = []
        r += 1  # row r's token is now the final layer's; the next frontier is row r+1 with the right token
    if pending_depths:
        steps += L - min(pending_depths)
    return {"steps": steps, "vanilla_steps": R * L, "head_evals": evals, "exits": exits, "wrong": wrong, "rows": R}


def simulate_set(traces: list[tuple[torch.Tensor, torch.Tensor]], layers, gamma, n_layers, max_pending=5,
                 head_cost: float = 0.0) -> dict:
    tot = Counter()
    for conf, correct in traces:
        tot.update(simulate(conf, correct, layers, gamma, n_layers, max_pending))
    steps, van = tot["steps"], tot["vanilla_steps"]
    rows = max(1, tot["rows"])
    return {"layers": list(layers), "gamma": gamma, "ideal_speedup": van / max(1, steps),
            "speedup_with_head_cost": van / max(1e-9, steps + head_cost * tot["head_evals"]),
            "exit_rate": tot["exits"] / rows, "rollbacks_per_100_tokens": 100 * tot["wrong"] / rows,
            "early_accuracy": 1 - tot["wrong"] / tot["exits"] if tot["exits"] else None,
            "steps": steps, "vanilla_steps": van, "head_evals": tot["head_evals"]}


def recommend(per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]], seq: torch.Tensor, n_layers: int,
              gammas=GAMMAS, max_heads: int = 3, max_pending: int = 5, head_cost: float = 0.0,
              min_accuracy: float = 0.0) -> tuple[dict, list[dict]]:
    """Best (layer set, gamma) by simulated ideal layer-step speedup on the held-out traces (ties: fewer heads,
    then higher gamma), among the configurations whose early tokens are right at least `min_accuracy` of the
    time (all of them when none is). per_layer: layer -> (conf [N], correct [N]) in the row order of `seq`."""
    layers_all = sorted(per_layer)
    bounds = torch.unique_consecutive(seq, return_counts=True)[1].tolist()
    results = []
    for k in range(1, min(max_heads, len(layers_all)) + 1):
        for subset in itertools.combinations(layers_all, k):
            conf = torch.stack([per_layer[l][0] for l in subset], 1)
            corr = torch.stack([per_layer[l][1] for l in subset], 1)
            traces, o = [], 0
            for n in bounds:
                traces.append((conf[o:o + n], corr[o:o + n]))
                o += n
            for g in gammas:
                results.append(simulate_set(traces, subset, g, n_layers, max_pending, head_cost))
    ok = [r for r in results if (r["early_accuracy"] if r["early_accuracy"] is not None else 1.0) >= min_accuracy]
    best = max(ok or results, key=lambda r: (round(r["ideal_speedup"], 6), -len(r["layers"]), r["gamma"]))
    return best, results


# ---------------------------------------------------------------------------------------------------------------
# The pipeline and the command line
# ---------------------------------------------------------------------------------------------------------------
def layer_params(cfg: LlamaConfig) -> int:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return 2 * cfg.d * q + 2 * cfg.d * kv + 3 * cfg.d * cfg.ffn_dim


def head_params(cfg: LlamaConfig, k: int) -> int:
    return cfg.d * cfg.d + (k if k else cfg.vocab_size) * cfg.d


def split_prompts(n: int, heldout_frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_held = max(1, round(n * heldout_frac)) if n > 1 else 0
    return sorted(perm[n_held:]), sorted(perm[:n_held])


def train_pipeline(model, data: dict, layers: Sequence[int], *, vocab_k: int = 4096, heldout_frac: float = 0.2,
                   epochs: int = 4, lr: float = 1e-3, batch: int = 256, max_heads: int = 3, max_pending: int = 5,
                   gammas=GAMMAS, seed: int = 0, min_accuracy: float = 0.0, log=print, progress: bool = True) -> dict:
    """Train a head at each layer of `layers` on `data` (from make_data), evaluate on the held-out prompts,
    recommend a layer subset and gamma. Returns {'heads': {layer: Head}, 'results': JSON-able dict}."""
    cfg = model.cfg
    cap: Captured = data["cap"]
    missing = sorted(set(layers) - set(cap.layers))
    if missing:
        raise ValueError(f"the generated data holds no hidden states at layers {missing}")
    bad = [l for l in layers if not 1 <= l < cfg.n_layers]
    if bad:
        raise ValueError(f"head layers must be in 1..{cfg.n_layers - 1}, got {bad}")
    n_prompts = len(data["prompts"])
    train_ids, held_ids = split_prompts(n_prompts, heldout_frac, seed)
    is_held = torch.zeros(n_prompts, dtype=torch.bool)
    is_held[held_ids] = True
    tr_rows = (~is_held[cap.seq]).nonzero().flatten()
    he_rows = is_held[cap.seq].nonzero().flatten()
    cap_tr, cap_he = cap.select(tr_rows), cap.select(he_rows)
    vocab = build_vocab([data["conts"][i] for i in train_ids], vocab_k, cfg.vocab_size)
    K = 0 if vocab is None else vocab.numel()
    cover = float(torch.isin(cap_he.y, vocab).float().mean()) if vocab is not None else 1.0
    log(f"{n_prompts} prompts ({len(train_ids)} train / {len(held_ids)} held out), {len(tr_rows)} / {len(he_rows)} "
        f"token rows; vocabulary: {'full' if vocab is None else f'{K} most frequent training tokens + rest'} "
        f"(covers {100 * cover:.1f}% of held-out greedy tokens)")
    lm_head = model.weights.lm_head.float()
    heads, per_head, per_layer_trace = {}, {}, {}
    t0 = time.time()
    for layer in sorted(layers):
        tr, he = HeadData(cap_tr, layer, vocab, cfg.vocab_size), HeadData(cap_he, layer, vocab, cfg.vocab_size)
        lens = Head.identity(layer, cfg.d, vocab)
        lens_kl = heldout_kl(lens, he, lm_head)
        head, hist = train_head(layer, tr, lm_head, vocab, epochs=epochs, lr=lr, batch=batch, seed=seed, heldout=he,
                                log=log, progress_desc=f"head @ layer {layer}" if progress else None)
        head = round_like_file(head)
        heads[layer] = head
        tok, conf = head_predictions(head, cap_he.x[layer], lm_head)
        correct = tok == cap_he.y
        ltok, lconf = head_predictions(lens, cap_he.x[layer], lm_head)
        per_layer_trace[layer] = (conf, correct)
        per_head[layer] = {"layer": layer, "heldout_kl": heldout_kl(head, he, lm_head), "identity_kl": lens_kl,
                           "top1_agreement": float(correct.float().mean()),
                           "identity_top1_agreement": float((ltok == cap_he.y).float().mean()),
                           "history": hist, "gammas": exit_table(conf, correct, gammas),
                           "identity_gammas": exit_table(lconf, ltok == cap_he.y, gammas)}
    train_s = time.time() - t0
    hc = head_params(cfg, K) / layer_params(cfg)
    best, sims = recommend(per_layer_trace, cap_he.seq, cfg.n_layers, gammas, max_heads, max_pending, hc, min_accuracy)
    results = {
        "model": model.source, "model_fingerprint": model.fingerprint, "n_layers": cfg.n_layers,
        "prompts": {"total": n_prompts, "train": len(train_ids), "heldout": len(held_ids),
                    "train_rows": len(tr_rows), "heldout_rows": len(he_rows)},
        "generation": {"max_new_tokens": data["key"]["max_new_tokens"], "seconds": data["seconds"],
                       "device": data.get("device"), "dtype": data.get("dtype")},
        "vocab_k": K, "heldout_vocab_coverage": cover,
        "training": {"epochs": epochs, "lr": lr, "batch": batch, "seed": seed, "seconds": train_s,
                     "loss": "forward KL(p_final || p_head) on the K tokens + rest (restricted) or the top-256 + tail (full)"},
        "head_cost_layers": hc, "max_pending": max_pending, "min_accuracy": min_accuracy,
        "per_head": [per_head[l] for l in sorted(per_head)],
        "recommended": best,
        "simulations": sorted(sims, key=lambda r: -r["ideal_speedup"])[:40],
    }
    return {"heads": heads, "vocab": vocab, "results": results}


def parse_layers(text: str) -> list[int]:
    out = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    if not out:
        raise ValueError(f"--layers {text!r} names no layer")
    return sorted(out)


def format_report(res: dict) -> str:
    lines = []
    lines.append(f"held-out: {res['prompts']['heldout']} prompts, {res['prompts']['heldout_rows']} token rows; "
                 f"vocabulary K={res['vocab_k'] or 'full'} (covers {100 * res['heldout_vocab_coverage']:.1f}%)")
    gammas = [g["gamma"] for g in res["per_head"][0]["gammas"]]
    lines.append("layer  KL(identity->trained)  top1  " + "  ".join(f"g={g:<4} exit/acc" for g in gammas))
    for h in res["per_head"]:
        cells = "  ".join(f"{100 * g['exit_rate']:5.1f}%/{100 * g['accuracy']:5.1f}%" if g["exits"] else
                          f"{100 * g['exit_rate']:5.1f}%/  -   " for g in h["gammas"])
        lines.append(f"{h['layer']:5d}  {h['identity_kl']:7.3f} -> {h['heldout_kl']:6.3f}     {100 * h['top1_agreement']:5.1f}%  {cells}")
    b = res["recommended"]
    acc = "-" if b["early_accuracy"] is None else f"{100 * b['early_accuracy']:.1f}%"
    lines.append(f"recommended: layers {b['layers']}, gamma {b['gamma']}: simulated ideal layer-step speedup "
                 f"{b['ideal_speedup']:.3f}x (exit rate {100 * b['exit_rate']:.1f}%, early accuracy {acc}, {b['rollbacks_per_100_tokens']:.2f} "
                 f"rollbacks / 100 tokens; counting each head evaluation as {res['head_cost_layers']:.2f} layers: "
                 f"{b['speedup_with_head_cost']:.3f}x)")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF directory")
    p.add_argument("--layers", required=True, help="candidate head layers, e.g. '18,20,22-26' (a head reads h after that many layers)")
    p.add_argument("--prompts", default="general", help="'code', 'general' (shipped sets) or a file (JSON list or one prompt per line)")
    p.add_argument("--out", required=True, help="head file to write (safetensors), holding the recommended layer set")
    p.add_argument("--n-prompts", type=int, default=None, help="use the first N prompts of the set (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy continuation length per prompt")
    p.add_argument("--heldout", type=float, default=0.2, help="fraction of prompts held out for evaluation")
    p.add_argument("--vocab", type=int, default=4096, help="restricted vocabulary size K (0 = full vocabulary)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=256, help="training minibatch (token rows)")
    p.add_argument("--gen-batch", type=int, default=64, help="prompts per batched generation forward")
    p.add_argument("--max-heads", type=int, default=3, help="largest layer set the recommendation considers")
    p.add_argument("--max-pending", type=int, default=5, help="simulator: most early tokens awaiting verification")
    p.add_argument("--min-accuracy", type=float, default=0.0,
                   help="recommend only configurations whose held-out early tokens are right at least this often")
    p.add_argument("--gammas", default=",".join(str(g) for g in GAMMAS))
    p.add_argument("--no-chat", action="store_true", help="encode prompts as plain text (default: chat template)")
    p.add_argument("--data-cache", default=None, help="file to keep the generated data in (reused when it matches)")
    p.add_argument("--results", default=None, help="also write the full results as JSON here")
    p.add_argument("--description", default=None, help="training-data description stored in the head file")
    p.add_argument("--device", default=None, help="torch device for generation (default: cuda where available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    from .heads import save_heads
    from .loader import load_model
    from .prompts import load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model)
    layers = parse_layers(args.layers)
    bad = [l for l in layers if not 1 <= l < model.cfg.n_layers]
    if bad:
        raise ValueError(f"--layers: {bad} outside 1..{model.cfg.n_layers - 1} for {model.source}")
    texts = load_prompts(args.prompts)
    if args.n_prompts:
        texts = texts[:args.n_prompts]
    if len(texts) < 2:
        raise ValueError(f"--prompts {args.prompts}: need at least 2 prompts (training + held-out), got {len(texts)}")
    gammas = tuple(float(g) for g in args.gammas.split(","))
    log = (lambda s: print(s, flush=True))
    data = make_data(model, texts, layers, args.max_new_tokens, chat=not args.no_chat, batch_size=args.gen_batch,
                     device=args.device, cache_file=args.data_cache, log=log)
    out = train_pipeline(model, data, layers, vocab_k=args.vocab, heldout_frac=args.heldout, epochs=args.epochs,
                         lr=args.lr, batch=args.batch, max_heads=args.max_heads, max_pending=args.max_pending,
                         gammas=gammas, seed=args.seed, min_accuracy=args.min_accuracy, log=log)
    res = out["results"]
    best = res["recommended"]
    desc = args.description or (f"greedy continuations ({args.max_new_tokens} new tokens) of {res['prompts']['train']} "
                                f"prompts from '{args.prompts}' ({'chat template' if not args.no_chat else 'plain text'}); "
                                f"{res['prompts']['heldout']} prompts held out")
    res["command"] = "python -m adadecode train-heads " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("command", "func") and v not in (None, False))
    res["total_seconds"] = time.time() - t0
    res["description"] = desc
    meta = {"gamma": best["gamma"], "description": desc,
            "training": {k: res[k] for k in ("prompts", "generation", "vocab_k", "training", "max_pending", "min_accuracy")},
            "heldout": {"recommended": best, "per_head": [{k: h[k] for k in ("layer", "heldout_kl", "top1_agreement", "gammas")}
                                                          for h in res["per_head"]]}}
    save_heads(args.out, [out["heads"][l] for l in best["layers"]], model, meta)
    print(format_report(res))
    print(f"wrote {args.out} (layers {best['layers']}, gamma {best['gamma']}) in {res['total_seconds']:.0f} s")
    if args.results:
        with open(args.results, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0
