"""Kernel microbenchmarks of adadecode_cuda (issue 3) on SmolLM2-135M and Llama-3.1-8B layer shapes.

For every op and R in 1, 2, 4, 8, 16: the median time per launch from CUDA-graph replays, the bytes it must
move (weights, KV cache, activations), achieved GB/s and its fraction of a device-to-device copy measured in
the same run, and the same op through torch (cuBLAS / SDPA) side by side. Weights are cycled through enough
copies to exceed the L2 cache, so small models are measured from DRAM too.

    python bench/micro/run.py            # full suite
    python bench/micro/run.py --quick    # fewer rows/replays (smoke run)
    python bench/micro/run.py --check    # the arguments only (no GPU)

Writes bench/results/micro-<date>.json and .png and prints a table. Targets (reported, never asserted):
skinny GEMM on 8B shapes at R <= 8 >= 90% of copy bandwidth and ahead of torch; R = 8 within 5% of R = 1;
attention at a 4K context >= 80% of copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's adadecode (its atomic writer)
BF = torch.bfloat16
DEV = "cuda"

SHAPES = {
    "smollm2-135m": dict(d=576, H=9, Hkv=3, hd=64, ffn=1536, vocab=49152, theta=1e5),
    "llama-3.1-8b": dict(d=4096, H=32, Hkv=8, hd=128, ffn=14336, vocab=128256, theta=5e5),
}
L2_BYTES = 50 * 2**20


def copies_for(nbytes: int, cap: int = 64) -> int:
    """How many copies of a buffer of `nbytes` to cycle through so the working set exceeds 2x L2."""
    return max(1, min(cap, math.ceil(2 * L2_BYTES / max(nbytes, 1))))


def time_graph(fns, replays: int, inner: int) -> float:
    """Median microseconds per call: fns is a list of closures (one per weight copy) cycled `inner` times
    inside one CUDA graph; the graph is replayed `replays` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm up (and load modules) outside capture
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    n = 0
    with torch.cuda.graph(g):
        for i in range(inner):
            fns[i % len(fns)]()
            n += 1
    g.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    return statistics.median(times)


def copy_bandwidth(replays: int) -> float:
    """Device-to-device copy GB/s (bytes read + bytes written), 1 GiB buffers."""
    n = 2**30 // 2
    a = torch.empty(n, dtype=BF, device=DEV).normal_()
    b = torch.empty_like(a)
    us = time_graph([lambda: b.copy_(a)], replays, 4)
    return 2 * a.numel() * 2 / (us * 1e-6) / 1e9


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(BF)


def bench_ops(cuda, name: str, s: dict, rows: list[int], ctxs: list[int], replays: int, inner: int):
    d, H, Hkv, hd, ffn, V = s["d"], s["H"], s["Hkv"], s["hd"], s["ffn"], s["vocab"]
    qkv_n = (H + 2 * Hkv) * hd
    out = []

    def add(op, R, ctx, nbytes, ours, theirs):
        t_ours = time_graph(ours, replays, inner)
        t_torch = time_graph(theirs, replays, inner) if theirs else float("nan")
        out.append(dict(shape=name, op=op, R=R, ctx=ctx, bytes=nbytes, us=t_ours, torch_us=t_torch))

    gemms = [("gemm_qkv", qkv_n, d, "plain"), ("gemm_o+res", d, H * hd, "res"),
             ("gemm_gate_up_silu", ffn, d, "silu"), ("gemm_down+res", d, ffn, "res")]
    for op, N, K, ep in gemms:
        wbytes = N * K * 2 * (2 if ep == "silu" else 1)
        nc = copies_for(wbytes)
        ws = [rand(N, K, scale=K ** -0.5) for _ in range(nc)]
        wus = [rand(N, K, scale=K ** -0.5) for _ in range(nc)] if ep == "silu" else [None] * nc
        for R in rows:
            x = rand(R, K)
            y = rand(R, N)
            tmp, tmp2 = torch.empty(R, N, dtype=BF, device=DEV), torch.empty(R, N, dtype=BF, device=DEV)
            if ep == "plain":
                ours = [lambda w=w: cuda.skinny_gemm(x, w, y) for w in ws]
                theirs = [lambda w=w: torch.matmul(x, w.T, out=y) for w in ws]
            elif ep == "res":
                ours = [lambda w=w: cuda.skinny_gemm(x, w, y, residual=y) for w in ws]
                theirs = [lambda w=w: (torch.matmul(x, w.T, out=tmp), y.add_(tmp)) for w in ws]
            else:
                ours = [lambda w=w, wu=wu: cuda.skinny_gemm(x, w, y, w_up=wu) for w, wu in zip(ws, wus)]
                theirs = [lambda w=w, wu=wu: (torch.matmul(x, w.T, out=tmp), torch.matmul(x, wu.T, out=tmp2),
                                              torch.mul(F.silu(tmp), tmp2, out=y)) for w, wu in zip(ws, wus)]
            add(op, R, None, wbytes + R * K * 2 + R * N * 2 * (2 if ep == "res" else 1), ours, theirs)
            if ep != "res":  # the fused decode path: the layer's RMSNorm computed in the GEMM's prologue
                gamma = rand(K, scale=0.1) + 1
                fused = [lambda w=w, wu=wu: cuda.skinny_gemm(x, w, y, w_up=wu, norm_weight=gamma)
                         for w, wu in zip(ws, wus)]
                add(op + "+norm", R, None, wbytes + R * K * 2 + K * 2 + R * N * 2, fused, None)
        del ws, wus

    # attention: KV of one layer at context ctx (K and V of positions 0..ctx-1)
    for ctx in ctxs:
        kvbytes = ctx * Hkv * hd * 2 * 2
        nc = copies_for(kvbytes, cap=16)
        caches = [(rand(ctx + 16, Hkv, hd), rand(ctx + 16, Hkv, hd)) for _ in range(nc)]
        for R in rows:
            q = rand(R, H * hd)
            o = torch.empty(R, H * hd, dtype=BF, device=DEV)
            fp = torch.tensor([ctx - R], dtype=torch.int32, device=DEV)
            wsp = torch.zeros(cuda.attention_workspace_floats(R, H, hd, ctx), device=DEV)  # zero counters
            ours = [lambda kc=kc, vc=vc: cuda.attention(q, kc, vc, fp, o, H, ctx, workspace=wsp) for kc, vc in caches]
            two = [lambda kc=kc, vc=vc: cuda.attention(q, kc, vc, fp, o, H, ctx, workspace=wsp, single_launch=False)
                   for kc, vc in caches]
            mask = torch.ones(R, ctx, dtype=torch.bool, device=DEV).tril(ctx - R)
            qt = q.view(R, H, hd).transpose(0, 1)[None]

            def sdpa(kc, vc):
                k = kc[:ctx].permute(1, 0, 2)[None]
                v = vc[:ctx].permute(1, 0, 2)[None]
                return F.scaled_dot_product_attention(qt, k, v, attn_mask=None if R == 1 else mask, enable_gqa=True)

            theirs = [lambda kc=kc, vc=vc: sdpa(kc, vc) for kc, vc in caches]
            add(f"attention@{ctx}", R, ctx, kvbytes + 2 * R * H * hd * 2, ours, theirs)
            add(f"attention(2 launches)@{ctx}", R, ctx, kvbytes + 2 * R * H * hd * 2, two, None)
        del caches

    # rope + KV append, add_rmsnorm, embedding: small, latency-bound ops
    max_seq = 4096
    inv = 1.0 / (s["theta"] ** (torch.arange(0, hd, 2).float() / hd))
    fr = torch.outer(torch.arange(max_seq).float(), inv)
    cos, sin = fr.cos().to(DEV), fr.sin().to(DEV)
    kc, vc = rand(max_seq, Hkv, hd), rand(max_seq, Hkv, hd)
    table = rand(V, d)
    wn = rand(d)
    wqkvs = [rand(qkv_n, d, scale=d ** -0.5) for _ in range(copies_for(qkv_n * d * 2))]
    for R in rows:
        qkv = rand(R, qkv_n)
        fp = torch.tensor([100], dtype=torch.int32, device=DEV)
        c2 = torch.cat([cos[100:100 + R], cos[100:100 + R]], -1).to(BF)[:, None]
        s2 = torch.cat([sin[100:100 + R], sin[100:100 + R]], -1).to(BF)[:, None]
        pos = torch.arange(100, 100 + R, device=DEV)

        def torch_rope():
            qk = qkv[:, :(H + Hkv) * hd].view(R, H + Hkv, hd)
            x1, x2 = qk.chunk(2, -1)
            r = qk * c2 + torch.cat((-x2, x1), -1) * s2
            kc.index_copy_(0, pos, r[:, H:])
            vc.index_copy_(0, pos, qkv[:, (H + Hkv) * hd:].view(R, Hkv, hd))

        add("rope_append_kv", R, None, R * qkv_n * 2 * 2,
            [lambda: cuda.rope_append_kv(qkv, kc, vc, cos, sin, fp, H, Hkv)], [torch_rope])
        # the fused decode QKV: norm in the prologue, RoPE + K/V append in the epilogue (one launch for three)
        xq, qkv_out = rand(R, d), torch.empty(R, qkv_n, dtype=BF, device=DEV)
        add("qkv_rope (norm+gemm+rope)", R, None, qkv_n * d * 2 + R * d * 2 + R * qkv_n * 2,
            [lambda w=w: cuda.qkv_rope(xq, w, qkv_out, kc, vc, cos, sin, fp, H, Hkv, norm_weight=wn) for w in wqkvs],
            None)
        res, dl, o = rand(R, d), rand(R, d), torch.empty(R, d, dtype=BF, device=DEV)

        def torch_norm():
            res.add_(dl)
            xf = res.float()
            torch.mul(wn, (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(BF), out=o)

        add("add_rmsnorm", R, None, 4 * R * d * 2, [lambda: cuda.add_rmsnorm(res, dl, wn, o, 1e-5)], [torch_norm])
        tok = torch.randint(0, V, (R,), dtype=torch.int32, device=DEV)
        add("embedding", R, None, 2 * R * d * 2, [lambda: cuda.embedding(tok, table, o)],
            [lambda: torch.index_select(table, 0, tok, out=o)])

    # LM head + argmax + max prob (full vocabulary)
    nc = copies_for(V * d * 2, cap=4)
    heads = [rand(V, d, scale=d ** -0.5) for _ in range(nc)]
    for R in rows:
        x = rand(R, d)
        tok = torch.empty(R, dtype=torch.int32, device=DEV)
        mp, ls = torch.empty(R, device=DEV), torch.empty(R, device=DEV)
        wsp = torch.empty(cuda.lm_head_workspace_floats(R, V), device=DEV)
        logits = torch.empty(R, V, dtype=BF, device=DEV)

        def torch_head(w):
            torch.matmul(x, w.T, out=logits)
            lf = logits.float()
            m, i = lf.max(-1)
            return i, (m - torch.logsumexp(lf, -1)).exp()

        add("lm_head_argmax", R, None, V * d * 2 + R * d * 2,
            [lambda w=w: cuda.lm_head_argmax(x, w, tok, mp, lse=ls, workspace=wsp) for w in heads],
            [lambda w=w: torch_head(w) for w in heads])
        # the same with the seeded sampling epilogue (T 0.7; then top-k 50 + top-p 0.9): its cost over the argmax
        wss = torch.empty(cuda.lm_head_sample_workspace_floats(R, V), device=DEV)
        for op, k, p in (("lm_head_sample", 0, 1.0), ("lm_head_sample_topk_topp", 50, 0.9)):
            add(op, R, None, V * d * 2 + R * d * 2,
                [lambda w=w, k=k, p=p: cuda.lm_head_sample(x, w, tok, mp, 1, 100, 1 / 0.7, k, p, workspace=wss)
                 for w in heads], None)
    del heads
    return out


def bench_prefill(cuda, replays: int, inner: int, M: int = 2048):
    """Tensor-core prefill GEMM vs cuBLAS on 8B shapes at M rows (TFLOP/s)."""
    out = []
    for op, N, K, silu in (("tc_qkv", 6144, 4096, False), ("tc_gate_up_silu", 14336, 4096, True),
                           ("tc_down", 4096, 14336, False)):
        x = rand(M, K)
        w = rand(N, K, scale=K ** -0.5)
        wu = rand(N, K, scale=K ** -0.5) if silu else None
        y, t1, t2 = (torch.empty(M, N, dtype=BF, device=DEV) for _ in range(3))
        ours = [lambda: cuda.gemm_tc(x, w, y, w_up=wu)]
        theirs = ([lambda: (torch.matmul(x, w.T, out=t1), torch.matmul(x, wu.T, out=t2), torch.mul(F.silu(t1), t2, out=y))]
                  if silu else [lambda: torch.matmul(x, w.T, out=y)])
        flops = 2 * M * N * K * (2 if silu else 1)
        t_ours, t_torch = time_graph(ours, replays, inner), time_graph(theirs, replays, inner)
        out.append(dict(shape="llama-3.1-8b", op=op, R=M, ctx=None, flops=flops, us=t_ours, torch_us=t_torch))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="R in 1, 8, 16, one context, few replays")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--ctx", default="1024,4096", help="attention contexts")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--check", action="store_true",
                    help="check the arguments, say what would run, and exit (no GPU needed)")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    if not shapes or set(shapes) - set(SHAPES):
        ap.error(f"--shapes takes {sorted(SHAPES)}, got {args.shapes!r}")
    try:
        rows = [1, 8, 16] if args.quick else [int(r) for r in args.rows.split(",")]
        ctxs = [4096] if args.quick else [int(c) for c in args.ctx.split(",")]
    except ValueError:
        ap.error(f"--rows and --ctx take comma-separated integers, got {args.rows!r}, {args.ctx!r}")
    if not all(1 <= r <= 16 for r in rows) or min(ctxs) < 1 or args.replays < 1:
        ap.error("--rows must be in 1..16 (the skinny kernels' rows), --ctx and --replays positive")
    if args.check:
        print(f"check: would time {shapes} at R {rows}, attention contexts {ctxs}, {args.replays} replays, and the "
              f"prefill GEMMs; results to {args.out_dir}")
        return 0
    if not torch.cuda.is_available():
        sys.exit("bench/micro/run.py needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    import adadecode_cuda as cuda

    replays = 5 if args.quick else args.replays
    inner = 10 if args.quick else 20

    copy_gbps = copy_bandwidth(replays)
    results = []
    for name in shapes:
        results += bench_ops(cuda, name, SHAPES[name], rows, ctxs, replays, inner)
    prefill = bench_prefill(cuda, replays, 3 if args.quick else 5)
    for r in results:
        r["gbps"] = r["bytes"] / (r["us"] * 1e-6) / 1e9
        r["torch_gbps"] = r["bytes"] / (r["torch_us"] * 1e-6) / 1e9
        r["pct_copy"] = 100 * r["gbps"] / copy_gbps
        r["torch_pct_copy"] = 100 * r["torch_gbps"] / copy_gbps
    for r in prefill:
        r["tflops"] = r["flops"] / (r["us"] * 1e-6) / 1e12
        r["torch_tflops"] = r["flops"] / (r["torch_us"] * 1e-6) / 1e12

    # table
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    hdr = f"{'shape':14} {'op':20} {'R':>3} {'us':>9} {'GB/s':>7} {'%copy':>6} | {'torch us':>9} {'%copy':>6}  speedup"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['shape']:14} {r['op']:20} {r['R']:>3} {r['us']:9.2f} {r['gbps']:7.0f} {r['pct_copy']:6.1f} | "
              f"{r['torch_us']:9.2f} {r['torch_pct_copy']:6.1f}  {r['torch_us'] / r['us']:5.2f}x")
    print()
    for r in prefill:
        print(f"prefill {r['op']:18} M={r['R']}: {r['us']:9.1f} us {r['tflops']:6.1f} TFLOP/s | torch {r['torch_us']:9.1f} us "
              f"{r['torch_tflops']:6.1f} TFLOP/s")

    # targets (reported, not asserted)
    targets = []
    big = [r for r in results if r["shape"] == "llama-3.1-8b" and r["op"].startswith("gemm_")]
    for r in big:
        if r["R"] <= 8:
            targets.append(dict(target=f"{r['op']} R={r['R']} >= 90% copy and beats torch",
                                ok=r["pct_copy"] >= 90 and r["us"] < r["torch_us"],
                                value=f"{r['pct_copy']:.1f}% copy, {r['torch_us'] / r['us']:.2f}x torch"))
    for op in sorted({r["op"] for r in big}):
        t1 = [r["us"] for r in big if r["op"] == op and r["R"] == 1]
        t8 = [r["us"] for r in big if r["op"] == op and r["R"] == 8]
        if t1 and t8:
            targets.append(dict(target=f"{op} R=8 within 5% of R=1", ok=t8[0] <= 1.05 * t1[0],
                                value=f"{100 * (t8[0] / t1[0] - 1):+.1f}%"))
    for r in results:
        if r["shape"] == "llama-3.1-8b" and r["op"] == "attention@4096":
            targets.append(dict(target=f"attention@4096 R={r['R']} >= 80% copy", ok=r["pct_copy"] >= 80,
                                value=f"{r['pct_copy']:.1f}%"))
    print("\ntargets:")
    for t in targets:
        print(f"  [{'ok' if t['ok'] else 'MISS'}] {t['target']}: {t['value']}")

    now = dt.datetime.now()
    meta = dict(device=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                command=" ".join([sys.executable] + sys.argv), date=now.isoformat(timespec="seconds"),
                copy_gbps=copy_gbps)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"micro-{now.strftime('%Y%m%d-%H%M%S')}"
    from adadecode.model.filesys import write_atomic

    write_atomic(stem.with_suffix(".json"), json.dumps(dict(meta=meta, results=results, prefill=prefill,
                                                            targets=targets), indent=1))
    plot(results, meta, stem.with_suffix(".png"))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


def plot(results, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in results})
    fig, axes = plt.subplots(len(shapes), 1, figsize=(14, 4.5 * len(shapes)), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        rs = [r for r in results if r["shape"] == shape]
        ops = list(dict.fromkeys(r["op"] for r in rs))
        Rs = sorted({r["R"] for r in rs})
        width = 0.8 / len(Rs)
        for j, R in enumerate(Rs):
            xs = [i + j * width for i in range(len(ops))]
            ours = [next((r["pct_copy"] for r in rs if r["op"] == op and r["R"] == R), 0) for op in ops]
            theirs = [next((r["torch_pct_copy"] for r in rs if r["op"] == op and r["R"] == R), 0) for op in ops]
            ax.bar(xs, ours, width, label=f"R={R}", color=plt.cm.viridis(j / max(1, len(Rs) - 1)))
            ax.scatter(xs, theirs, marker="_", color="red", s=80, zorder=3, label="torch" if j == 0 else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ops))])
        ax.set_xticklabels(ops, rotation=20, ha="right")
        ax.set_ylabel("% of D2D copy bandwidth")
        ax.axhline(90, ls="--", c="gray", lw=0.8)
        ax.set_title(f"{shape} on {meta['device']} (copy {meta['copy_gbps']:.0f} GB/s), {meta['date']}")
        ax.legend(ncol=len(Rs) + 1, fontsize=8)
    fig.tight_layout()
    from adadecode.model.filesys import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
