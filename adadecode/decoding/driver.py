"""AdaDecode and a LayerSkip-style baseline on any engine of the contract (docs/design.md#schedule).

Both are exact: every token they output is the greedy token of the full model, so the output equals
`vanilla.generate_vanilla`'s on the same engine (the engine must be batch-invariant, docs/design.md#invariance). Under seeded
sampling (temperature > 0, adadecode.engines.sampling) `final` draws each row's token with noise that depends only on
(seed, position), so verification is the same equality test and the output is vanilla sampling's with that seed;
a head then guesses its own draw with the same noise (head_guess="sample") or its argmax.

The schedule (`schedule`, shared by every method here)
--------------------------------------------------------
The rows in flight are the contiguous positions `first..front`. Row `first`'s input token is verified;
rows `first+1..front` were started with *guesses* (early tokens, unverified): the guess emitted at row
`p` is the model's early prediction of the token after position `p`, i.e. row `p+1`'s input. Row
`front` is the frontier. Depths never increase with position.

* Frontier at depth `d` == the layer of a head, and an exit is allowed (fewer than `max_pending`
  guesses pending, and the budget leaves room for it): ask the head. Confident (`confidence > gamma`)
  -> the head's token is the guess for position `front+1`; row `front` stays at depth `d` (its
  remaining layers are deferred) and the guess is embedded at `front+1`, depth 0: the new frontier.
* Otherwise advance: the rows at the frontier's depth `d` are a contiguous suffix `s..front`; run them
  in one `run_layers(s, front, d, stop)` where `stop` is the next head layer (only while an exit is
  allowed), the depth of row `s-1` (where it joins the batch), or `L`, whichever comes first.
* Frontier at depth `L`: so is every row in flight. `final(first, front)` verifies the guesses in
  order: the final token of row `q` is the verified token after `q`; equal to the guess at row `q`
  -> accepted, go on; different -> rejected: the final token replaces it, `truncate(q+1)` drops every
  later row and KV entry, and decoding goes on from the corrected token at `q+1`. When every guess
  holds, the frontier's final token is one more verified token.
* Output, EOS and `max_new_tokens` are those of vanilla decoding: tokens are output (and `on_token`
  called) only once verified, in order; generation stops after a verified EOS or the
  `max_new_tokens`-th token. An early EOS is a guess like any other. No exit is taken whose next row
  could never produce an output token (verified tokens + pending guesses + 1 must fit the budget).

LayerSkip (`generate_layerskip`) is the same schedule with one head that always exits and
`max_pending = k`: draft k tokens from layer `l`, then the (k+1)-th row runs layers `[0, l)` and all
k+1 rows run `[l, L)` together, reusing the drafts' KV below `l`, and `final` verifies the drafts.

Statistics (`Generation.stats`)
-------------------------------
tokens                 generated tokens (len(Generation.tokens))
early                  early exits taken (guesses emitted) = accepted + rejected + discarded
accepted / rejected    guesses confirmed / refuted by `final` (at most one rejection per verification)
discarded              guesses dropped unverified (after a rejection, or after the last output token)
frontier_tokens        verified tokens that were no guess (the frontier's final token after a fully
                       accepted verification); tokens == 1 + accepted + rejected + frontier_tokens
exit_layer_hist        {layer: early exits there}; accepted_layer_hist / rejected_layer_hist likewise
layer_steps            sum over `run_layers` calls of (l1 - l0): decoder-layer launches, whatever the
                       number of rows in them (batch-1 decode is bound by reading the weights, so a
                       layer over a few rows costs about one layer over one row)
vanilla_layer_steps    (tokens - 1) * L: what vanilla decoding runs for the same tokens (the first token
                       comes from prefill in both); ideal_speedup = vanilla_layer_steps / layer_steps
row_layer_steps        sum over `run_layers` calls of rows * (l1 - l0)
rows_per_step          {rows: layer steps run with that many rows}; its values sum to layer_steps
run_layers_calls, head_calls, verify_calls (`final` calls after the prefill's)
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import Callable, Sequence

from ..engines.cost import step_cost
from ..engines.sampling import make_sampling
from ..errors import BadOption
from .common import Generation, Schedule, check_request, final_call, runs
from .context import ContextGuesser

HEAD_GUESSES = ("sample", "argmax")


def _engine_heads(engine, heads):
    if heads is not None:
        heads = list(heads)
        engine.set_heads(heads)
        return heads
    heads = getattr(engine, "heads", None)
    if not heads:
        raise ValueError("no intermediate heads: pass heads=... or call engine.set_heads(...) first")
    return list(heads)


def _check_pending(engine, max_pending: int, what: str = "max_pending") -> int:
    if isinstance(max_pending, bool) or int(max_pending) != max_pending or max_pending < 1:
        raise BadOption(f"{what} must be an integer >= 1, got {max_pending!r}", param=what)
    max_pending = int(max_pending)
    max_rows = getattr(engine, "max_rows", None)
    if max_rows is not None and max_pending + 1 > max_rows:
        raise BadOption(f"{what}={max_pending} needs {max_pending + 1} rows in flight, but the engine holds "
                        f"max_rows={max_rows}; lower {what} or build the engine with max_rows >= {max_pending + 1}",
                        param=what)
    return max_pending


def adadecode_steps(engine, prompt_tokens: Sequence[int], max_new_tokens: int, *,
                       gamma: float | Sequence[float] = 0.75, eos_ids: Sequence[int] = (), max_pending: int = 5,
                       heads=None, on_token: Callable[[int], None] | None = None, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, seed: int = 0, head_guess: str = "sample",
                       context=False, max_chain: int = 8, step_cost=None) -> Schedule:
    """AdaDecode: exact, with early exits at every head whose confidence exceeds `gamma`.

    heads: the intermediate heads (set on the engine with `set_heads`); None uses the engine's own.
    gamma: one threshold, or one per head (a head is confident when its confidence > gamma).
    max_pending: most early tokens awaiting verification (the engine needs max_rows >= max_pending + 1).
    on_token: called with each verified token, in order.
    temperature, top_k, top_p, seed: as generate_vanilla (0: greedy); the output is vanilla's with the same seed.
    head_guess (sampling only): a head guesses its own draw with the same noise ("sample") or its argmax.
    context: guesses from the context too (decoding/context.py: chains of up to `max_chain` tokens beside the
        frontier, drafted when the engine's measured step cost says they pay); True, False, or a ContextGuesser
        of the caller's (its cost model and statistics). step_cost: a StepCost to use instead of the engine's
        (engines/cost.py).
    """
    sampling = make_sampling(temperature, top_k, top_p, seed)
    head_guess = _check_head_guess(head_guess)
    prompt = check_request(engine, prompt_tokens, max_new_tokens)
    max_pending = _check_pending(engine, max_pending)
    heads = _engine_heads(engine, heads)
    guesser = _context_guesser(engine, context, max_chain, step_cost)
    if isinstance(gamma, (int, float)):
        gammas = [float(gamma)] * len(heads)
    else:
        gammas = [float(g) for g in gamma]
        if len(gammas) != len(heads):
            raise BadOption(f"gamma has {len(gammas)} values for {len(heads)} heads", param="gamma")
    if any(math.isnan(g) for g in gammas):
        raise BadOption(f"gamma must be a number, got {gamma!r}", param="gamma")
    return schedule(engine, prompt, max_new_tokens, heads=heads, active=range(len(heads)), gammas=gammas,
                    max_pending=max_pending, eos_ids=eos_ids, on_token=on_token,
                    method="adadecode+context" if guesser else "adadecode", sampling=sampling,
                    head_guess=head_guess, context=guesser)


def lookup_steps(engine, prompt_tokens: Sequence[int], max_new_tokens: int, *, eos_ids: Sequence[int] = (),
                    on_token: Callable[[int], None] | None = None, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0, max_chain: int = 8, step_cost=None,
                    context=True) -> Schedule:
    """Guesses from the context alone (no heads): chains of up to `max_chain` tokens that followed the latest
    earlier occurrence of the last tokens, verified by the final layer, drafted when they pay on this engine.
    Exact, greedy or sampled (the options of generate_vanilla); context: True or a ContextGuesser."""
    sampling = make_sampling(temperature, top_k, top_p, seed)
    prompt = check_request(engine, prompt_tokens, max_new_tokens)
    if context is False:
        raise BadOption("lookup decoding takes its guesses from the context: context cannot be false", param="context")
    guesser = _context_guesser(engine, context, max_chain, step_cost)
    return schedule(engine, prompt, max_new_tokens, heads=[], active=[], gammas=[], max_pending=0,
                    eos_ids=eos_ids, on_token=on_token, method="lookup", sampling=sampling, context=guesser)


def _context_guesser(engine, context, max_chain, given_cost) -> ContextGuesser | None:
    if isinstance(context, ContextGuesser):
        return context
    if not isinstance(context, bool):
        raise BadOption(f"context must be true, false or a ContextGuesser, got {context!r}", param="context")
    if not context:
        return None
    if isinstance(max_chain, bool) or not isinstance(max_chain, int) or max_chain < 1:
        raise BadOption(f"max_chain must be an integer >= 1, got {max_chain!r}", param="max_chain")
    if max_chain + 1 > engine.max_rows:
        raise BadOption(f"max_chain={max_chain} needs {max_chain + 1} rows in flight, but the engine holds "
                        f"max_rows={engine.max_rows}; lower max_chain or build the engine with max_rows >= "
                        f"{max_chain + 1}", param="max_chain")
    cost = given_cost if given_cost is not None else step_cost(engine)  # before the prefill: see engines/cost.py
    return ContextGuesser(cost, engine.n_layers, max_chain=max_chain)


def layerskip_steps(engine, prompt_tokens: Sequence[int], max_new_tokens: int, *, head_index: int = -1,
                       k: int = 4, eos_ids: Sequence[int] = (), heads=None,
                       on_token: Callable[[int], None] | None = None, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int = 0, head_guess: str = "sample") -> Schedule:
    """LayerSkip-style self-speculative decoding: draft up to `k` tokens with the head `head_index` (no
    confidence threshold), then verify them with the remaining layers, reusing the drafts' KV. Exact, greedy or
    sampled (the options of generate_adadecode)."""
    sampling = make_sampling(temperature, top_k, top_p, seed)
    head_guess = _check_head_guess(head_guess)
    prompt = check_request(engine, prompt_tokens, max_new_tokens)
    k = _check_pending(engine, k, "k")
    heads = _engine_heads(engine, heads)
    if not -len(heads) <= head_index < len(heads):
        raise BadOption(f"head_index {head_index} is out of range for {len(heads)} heads", param="head_index")
    head_index %= len(heads)
    gammas = [-math.inf] * len(heads)
    return schedule(engine, prompt, max_new_tokens, heads=heads, active=[head_index], gammas=gammas,
                    max_pending=k, eos_ids=eos_ids, on_token=on_token, method="layerskip",
                    sampling=sampling, head_guess=head_guess)


def _check_head_guess(head_guess: str) -> str:
    if head_guess not in HEAD_GUESSES:
        raise BadOption(f"head_guess must be one of {HEAD_GUESSES}, got {head_guess!r}", param="head_guess")
    return head_guess


def schedule(engine, prompt: list[int], max_new_tokens: int, *, heads, active, gammas, max_pending, eos_ids,
             on_token, method, sampling=None, head_guess="sample", context=None):
    """The schedule of the module docstring as a generator: it yields each engine call it needs, as (method name,
    args, kwargs), receives the call's result, and returns the Generation. `engine` is read for its shape
    (n_layers, max_rows, max_seq) and its measured step cost only: every call goes out through the yields, so a
    caller may run several schedules' calls together (rows of several sequences in one step).
    context: a ContextGuesser (decoding/context.py) whose chains are embedded beside every new depth-0 frontier when
    its cost model says they pay, or None (heads only)."""
    L = engine.n_layers
    head_at: dict[int, int] = {}  # layer -> head index
    for i in active:
        layer = int(heads[i].layer)
        if not 0 <= layer < L:
            raise ValueError(f"head {i} is at layer {layer}; heads must sit at layers 0..{L - 1} of this {L}-layer model")
        if layer in head_at:
            raise ValueError(f"heads {head_at[layer]} and {i} are both at layer {layer}; give one head per layer")
        head_at[layer] = i
    head_layers = sorted(head_at)
    eos = set(int(e) for e in eos_ids)
    M = max_new_tokens
    # the engine's step cost prices each step (stats["modeled_speedup"]): the guesser's, or one measured already
    cost = context.cost if context is not None else getattr(engine, "_step_cost", None)

    st = dict(early=0, accepted=0, rejected=0, discarded=0, frontier_tokens=0, layer_steps=0, row_layer_steps=0,
              run_layers_calls=0, head_calls=0, verify_calls=0)
    src = {"heads": Counter(), "context": Counter()}  # per source: guesses, accepted, rejected, discarded
    exit_hist, acc_hist, rej_hist, rows_hist = Counter(), Counter(), Counter(), Counter()
    modeled = 0.0  # seconds the cost model gives this run's steps (with a context guesser)

    t0 = time.perf_counter()
    yield "prefill", (prompt,), {}
    n = len(prompt)
    tokens = [(yield final_call(n - 1, n - 1, sampling))[0]]
    t1 = time.perf_counter()
    if on_token:
        on_token(tokens[0])
    done = tokens[0] in eos or len(tokens) >= M

    # rows in flight: positions first..front; depth[i] is row first+i's depth; guess[i] the early token emitted at
    # row first+i, i.e. row first+i+1's input, and kind[i] where it came from: the layer of the head that emitted
    # it, or ("context", n, j) for token j of a chain matched on n tokens
    first = front = n
    depth: list[int] = []
    guess: list[int] = []
    kind: list = []
    head_pending = 0

    def chain():
        """Embed the context's guess chain after the new frontier, as long as its cost model says it pays."""
        nonlocal front
        room = min(engine.max_rows - (front - first + 1), M - len(tokens) - len(guess) - 1,
                   engine.max_seq - 1 - front)
        if room <= 0:
            return
        toks, order = context.propose(_tail(context.max_n, prompt, tokens, guess), room, rows=front - first + 1,
                                      p_front=context.p_inputs(kind))
        for j, tok in enumerate(toks[:room]):
            guess.append(tok)
            kind.append(("context", order, j))
            src["context"]["guesses"] += 1
            front += 1
            yield "embed", (front, tok), {}
            depth.append(0)
            if tok in eos:  # nothing after an EOS could be output
                break

    if not done:
        yield "embed", (front, tokens[-1]), {}
        depth.append(0)
        if context is not None:
            context.start(prompt + tokens)
            yield from chain()

    while not done:
        d = depth[-1]
        if d == L:  # every row in flight is at depth L: verify the guesses in order
            fin = yield final_call(first, front, sampling)
            st["verify_calls"] += 1
            if cost is not None:
                modeled += cost.final_s(front - first + 1)
            for i, f in enumerate(fin):
                q = first + i
                tokens.append(f)
                if on_token:
                    on_token(f)
                wrong = False
                if i < len(guess):
                    k = kind[i]
                    s = "context" if isinstance(k, tuple) else "heads"
                    ok = f == guess[i]
                    if ok:
                        st["accepted"] += 1
                        src[s]["accepted"] += 1
                        if s == "heads":
                            acc_hist[k] += 1
                    else:
                        wrong = True
                        st["rejected"] += 1
                        src[s]["rejected"] += 1
                        if s == "heads":
                            rej_hist[k] += 1
                    if context is not None:
                        context.record(k, ok)
                else:
                    st["frontier_tokens"] += 1
                stop = f in eos or len(tokens) >= M
                if wrong or stop or i == len(guess):
                    for k in kind[i + 1:]:
                        src["context" if isinstance(k, tuple) else "heads"]["discarded"] += 1
                    st["discarded"] += max(0, len(guess) - i - 1)
                    yield "truncate", (q + 1,), {}  # keeps exactly what vanilla decoding would have in the cache
                    if stop:
                        done = True
                    else:
                        first = front = q + 1
                        yield "embed", (front, f), {}
                        depth, guess, kind, head_pending = [0], [], [], 0
                        if context is not None:
                            context.extend(tokens[len(tokens) - (i + 1):])
                            yield from chain()
                    break
            continue

        pending = len(guess)
        # an exit here creates row front+1, which is only worth running if it can yield an output token:
        # tokens so far + pending guesses + the new guess + the new frontier's token must fit the budget
        can_exit = (head_pending < max_pending and len(tokens) + pending + 2 <= M and front + 1 < engine.max_seq
                    and front - first + 2 <= engine.max_rows)
        # with a context chain in flight an exit is priced too (ContextGuesser.exit_pays): the head is not even
        # asked when the chain's rows would wait longer for it than its guess is worth; without one, AdaDecode's rule
        if can_exit and d in head_at and (context is None or not any(isinstance(k, tuple) for k in kind)
                                          or context.exit_pays(kind, d, front - first + 1)):
            hi = head_at[d]
            if sampling is not None and head_guess == "sample":  # its own draw, with the final layer's noise
                tok, conf = yield "head", (front, hi), {"sampling": sampling}
            else:
                tok, conf = yield "head", (front, hi), {}
            st["head_calls"] += 1
            if conf > gammas[hi]:
                st["early"] += 1
                src["heads"]["guesses"] += 1
                exit_hist[d] += 1
                guess.append(int(tok))
                kind.append(d)
                head_pending += 1
                front += 1
                yield "embed", (front, int(tok)), {}
                depth.append(0)
                if context is not None:
                    yield from chain()
                continue

        # advance the rows at the frontier's depth (a contiguous suffix) to the next stop
        s = len(depth) - 1
        while s > 0 and depth[s - 1] == d:
            s -= 1
        stop = depth[s - 1] if s > 0 else L
        if can_exit:
            nxt = next((h for h in head_layers if h > d), L)
            stop = min(stop, nxt)
        yield "run_layers", (first + s, front, d, stop), {}
        rows = len(depth) - s
        st["run_layers_calls"] += 1
        st["layer_steps"] += stop - d
        st["row_layer_steps"] += rows * (stop - d)
        rows_hist[rows] += stop - d
        if cost is not None:
            modeled += (stop - d) * cost.layer_s(rows)
        for i in range(s, len(depth)):
            depth[i] = stop

    t2 = time.perf_counter()
    st["tokens"] = len(tokens)
    st["vanilla_layer_steps"] = (len(tokens) - 1) * L
    st["ideal_speedup"] = st["vanilla_layer_steps"] / st["layer_steps"] if st["layer_steps"] else 1.0
    st["exit_layer_hist"] = dict(sorted(exit_hist.items()))
    st["accepted_layer_hist"] = dict(sorted(acc_hist.items()))
    st["rejected_layer_hist"] = dict(sorted(rej_hist.items()))
    st["rows_per_step"] = dict(sorted(rows_hist.items()))
    st["guesses"] = st["accepted"] + st["rejected"] + st["discarded"]
    st["tokens_per_verify"] = (len(tokens) - 1) / st["verify_calls"] if st["verify_calls"] else 0.0
    st["sources"] = {k: {f: v[f] for f in ("guesses", "accepted", "rejected", "discarded")} for k, v in src.items()}
    if cost is not None:
        vanilla = (len(tokens) - 1) * cost.token_s(L)
        st["modeled_speedup"] = vanilla / modeled if modeled else 1.0
    if context is not None:
        st["context"] = context.summary()
    st["method"] = method
    if sampling is not None:
        st["sampling"] = {**dataclasses.asdict(sampling), "head_guess": head_guess}
    st["max_pending"] = max_pending
    return Generation(prompt_tokens=prompt, tokens=tokens, seconds=t2 - t0, decode_seconds=t2 - t1, stats=st)


generate_adadecode = runs(adadecode_steps)
generate_lookup = runs(lookup_steps)
generate_layerskip = runs(layerskip_steps)


def _tail(n: int, *parts: list[int]) -> list[int]:
    """The last n tokens of the concatenated parts, without building the concatenation (the context may be long)."""
    out: list[int] = []
    for part in reversed(parts):
        take = n - len(out)
        if take <= 0:
            break
        out[:0] = part[-take:]
    return out
