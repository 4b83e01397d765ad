"""The schedule simulator: AdaDecode's layer steps on a continuation, from per-row head traces
(confidence, correct), and the choice of layer set and gamma that maximises the simulated speedup."""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Sequence

import torch

GAMMAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def simulate(conf: torch.Tensor, correct: torch.Tensor, layers: Sequence[int], gamma: float, n_layers: int,
             max_pending: int = 5) -> dict:
    """Layer steps of AdaDecode on one continuation, from per-row head traces.

    conf, correct: [R, H] for the rows holding generated tokens 0..R-1 (row r predicts token r+1), heads in
    `layers` order (ascending). One layer step = one launch of one decoder layer, whatever the number of rows.

    Rules (docs/design.md#schedule): the frontier row runs from layer 0; at each head layer, if the head is confident
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
    conf_ok = (conf > torch.as_tensor(gamma, dtype=conf.dtype)).tolist()  # gamma: one, or one per head
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
    gamma = [float(g) for g in gamma] if isinstance(gamma, (list, tuple)) else float(gamma)
    return {"layers": list(layers), "gamma": gamma, "ideal_speedup": van / max(1, steps),
            "speedup_with_head_cost": van / max(1e-9, steps + head_cost * tot["head_evals"]),
            "exit_rate": tot["exits"] / rows, "rollbacks_per_100_tokens": 100 * tot["wrong"] / rows,
            "early_accuracy": 1 - tot["wrong"] / tot["exits"] if tot["exits"] else None,
            "steps": steps, "vanilla_steps": van, "head_evals": tot["head_evals"]}


def recommend(per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]], seq: torch.Tensor, n_layers: int,
              gammas=GAMMAS, max_heads: int = 3, max_pending: int = 5, head_cost: float = 0.0,
              min_accuracy: float = 0.0) -> tuple[dict, list[dict]]:
    """Best (layer set, gamma) by simulated layer-step speedup, each head evaluation costing `head_cost` layer
    steps, on the held-out traces (ties: fewer heads,
    then higher gamma), among the configurations whose early tokens are right at least `min_accuracy` of the
    time (all of them when none is). per_layer: layer -> (conf [N], correct [N]) in the row order of `seq`."""
    layers_all = sorted(per_layer)
    results = []
    for k in range(1, min(max_heads, len(layers_all)) + 1):
        for subset in itertools.combinations(layers_all, k):
            traces = traces_of(per_layer, seq, subset)
            for g in gammas:
                results.append(simulate_set(traces, subset, g, n_layers, max_pending, head_cost))
    ok = [r for r in results if (r["early_accuracy"] if r["early_accuracy"] is not None else 1.0) >= min_accuracy]
    best = max(ok or results, key=lambda r: (round(r["speedup_with_head_cost"], 6), -len(r["layers"]), r["gamma"]))
    return best, results


def traces_of(per_layer, seq, layers):
    conf = torch.stack([per_layer[l][0] for l in layers], 1)
    corr = torch.stack([per_layer[l][1] for l in layers], 1)
    traces, o = [], 0
    for n in torch.unique_consecutive(seq, return_counts=True)[1].tolist():
        traces.append((conf[o:o + n], corr[o:o + n]))
        o += n
    return traces


def tune_gammas(per_layer, seq: torch.Tensor, n_layers: int, start: dict, gammas=GAMMAS, max_pending: int = 5,
                head_cost: float = 0.0, min_accuracy: float = 0.0, rounds: int = 3) -> dict:
    """Per-head gamma for the layer set of `start` (a simulate_set result): coordinate ascent over `gammas`, one
    head at a time, on the simulated speedup with head costs counted, keeping early accuracy >= min_accuracy."""
    layers = start["layers"]
    traces = traces_of(per_layer, seq, layers)
    g0 = start["gamma"]
    cur = list(g0) if isinstance(g0, list) else [g0] * len(layers)
    ok = (lambda r: (r["early_accuracy"] if r["early_accuracy"] is not None else 1.0) >= min_accuracy)
    score = (lambda r: (ok(r), round(r["speedup_with_head_cost"], 6)))
    best = simulate_set(traces, layers, list(cur), n_layers, max_pending, head_cost)
    for _ in range(rounds):
        changed = False
        for j in range(len(layers)):
            for g in gammas:
                if g == cur[j]:
                    continue
                trial = cur[:j] + [g] + cur[j + 1:]
                r = simulate_set(traces, layers, trial, n_layers, max_pending, head_cost)
                if score(r) > score(best):
                    best, cur, changed = r, trial, True
        if not changed:
            break
    return best
