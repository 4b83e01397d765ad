"""Guesses from the context: the tokens that followed the latest earlier occurrence of the sequence's last n tokens.

Code, edits of a given text and answers grounded in a given document repeat their context: after "def foo(" in a
rewrite, the next tokens are often those that followed "def foo(" in the prompt. `NgramIndex` finds them without a
draft model and without rescanning the context: it keeps, for every n-gram (n = 1..max_n) of the verified tokens, the
position where its latest occurrence ended, updated by one dictionary write per order for each verified token.

    index = NgramIndex(prompt, max_n=3)
    chain, n = index.propose(tail, k=6)   # tail: the last tokens of prompt + output (+ pending guesses)
    index.extend(verified_tokens)

A proposal is a guess chain like the heads' guesses: the driver (driver.py) embeds it beside the frontier and
`final` verifies it, so a wrong proposal costs time, never a token.
"""
from __future__ import annotations

from typing import Sequence


class NgramIndex:
    """Latest occurrence of every n-gram (n = 1..max_n) of a growing token list whose next token is known.

    The n-gram ending at position i is indexed once token i + 1 exists (it has a continuation), so a lookup of the
    list's own last n tokens finds an earlier occurrence, never itself. Cost: O(max_n) per appended token and per
    lookup, whatever the context length.
    """

    def __init__(self, tokens: Sequence[int] = (), max_n: int = 3):
        if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
            raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}")
        self.max_n = max_n
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest occurrence
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        t = self.tokens
        t.append(int(token))
        end = len(t) - 1  # the n-grams that end at end - 1 now have a continuation: token `end`
        for n in range(1, min(self.max_n, end) + 1):
            self._last[tuple(t[end - n:end])] = end

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            self.append(tok)

    def propose(self, tail: Sequence[int], k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the latest earlier occurrence of tail's last n tokens (the longest n that
        occurs, n <= max_n), and that n; ([], 0) when none occurs. `tail` may end in unverified guesses."""
        if k <= 0:
            return [], 0
        for n in range(min(self.max_n, len(tail)), 0, -1):
            start = self._last.get(tuple(tail[len(tail) - n:]))
            if start is not None:
                return self.tokens[start:start + k], n
        return [], 0


class ContextGuesser:
    """The context's guesses for one generation, and when they pay: an NgramIndex over the verified tokens, the
    rate at which each kind of guess has been verified so far, and the engine's StepCost (engines/cost.py).

    A chain of k tokens beside the frontier costs the k extra rows of every layer and of the LM head; it gains one
    decode step for every token of it that `final` confirms (the frontier's trip through the layers yields k + 1
    tokens instead of 1). Token j of a chain matched on n tokens is right, given that the ones before it were, with
    probability p(n, j), estimated from the chains verified so far (a Beta prior, counts that fade while no chain
    of that kind is tried, so a context that starts to repeat itself is tried again). `propose` drafts the k that
    maximises expected gain minus cost, and nothing when no k gains: then the method is what it is without context.

    A head's exit is priced the same way (`exit_pays`), since with a chain in flight it is no longer nearly free: the
    rows at the head's layer wait while the new row runs the layers below it alone.
    """

    PRIOR = (1.0, 1.0)  # Beta(accepted, rejected) pseudo-counts: 0.5 before any evidence
    FADE = 0.97         # per declined proposal, the counts of its kind shrink toward the prior
    MAX_J = 8           # chain positions past this share one estimate

    def __init__(self, cost, n_layers: int, *, max_chain: int = 8, max_n: int = 3):
        if not isinstance(max_chain, int) or isinstance(max_chain, bool) or max_chain < 1:
            raise ValueError(f"max_chain must be an integer >= 1, got {max_chain!r}")
        self.cost, self.n_layers, self.max_chain, self.max_n = cost, n_layers, max_chain, max_n
        self.index = NgramIndex(max_n=max_n)
        self.counts: dict[tuple, list[float]] = {}  # (n, j) -> [accepted, verified]; ("head", layer) -> a head's
        self.proposals = self.drafted = self.declined = 0

    def start(self, tokens: Sequence[int]) -> None:
        """A new sequence: the index holds `tokens` (the prompt and the first token); the rates are kept."""
        self.index = NgramIndex(tokens, max_n=self.max_n)

    def extend(self, tokens: Sequence[int]) -> None:
        self.index.extend(tokens)

    def p(self, key) -> float:
        a0, b0 = self.PRIOR
        acc, seen = self.counts.get(key, (0.0, 0.0))
        return (acc + a0) / (seen + a0 + b0)

    @staticmethod
    def _key(kind) -> tuple:
        """("context", n, j) -> (n, j) with j capped; a head's layer d -> ("head", d): each head its own rate."""
        return (kind[1], min(kind[2] + 1, ContextGuesser.MAX_J)) if isinstance(kind, tuple) else ("head", kind)

    def record(self, kind, accepted: bool) -> None:
        c = self.counts.setdefault(self._key(kind), [0.0, 0.0])
        c[0] += accepted
        c[1] += 1

    def p_inputs(self, kinds) -> float:
        """The probability that every pending guess is right (so that a chain after them can be)."""
        p = 1.0
        for k in kinds:
            p *= self.p(self._key(k))
        return p

    def exit_pays(self, kinds, layer: int, rows: int) -> bool:
        """Whether to ask the head at `layer` for an exit at the frontier (rows in flight: `rows`; the pending guesses'
        kinds: `kinds`). Right (the head's guess and every pending one, probability p), the exit has the next token's
        row through `layer` already when the others reach the last layer: L - layer layers of one row saved. Wrong,
        the rows in flight waited `layer` layers for a row that is dropped. Either way the rows above `layer` run with
        one row more. The driver asks only while a chain is in flight (without one, an exit is AdaDecode's, taken on
        the head's confidence alone): p is then the chain's too, and an exit that would hold a long, likely chain
        back is not taken; with free rows it is taken when p > layer / L."""
        c, L = self.cost, self.n_layers
        p = self.p_inputs(kinds) * self.p(("head", layer))
        one = c.layer_s(1)
        extra = (L - layer) * (c.layer_s(rows + 1) - c.layer_s(rows)) + c.final_s(rows + 1) - c.final_s(rows)
        return p * (L - layer) * one >= (1 - p) * layer * one + extra

    def propose(self, tail: Sequence[int], room: int, *, rows: int, p_front: float = 1.0) -> tuple[list[int], int]:
        """The chain to embed after the frontier (rows in flight now: `rows`, the frontier included), at most
        `room` tokens, and the match order n; ([], 0) when no chain is expected to pay."""
        cand, n = self.index.propose(tail, min(room, self.max_chain))
        if not cand:
            return [], 0
        self.proposals += 1
        c = self.cost
        token = c.token_s(self.n_layers)
        base = self.n_layers * c.layer_s(rows) + c.final_s(rows)
        best_k, best, reach = 0, 0.0, p_front
        gain = 0.0
        for k in range(1, len(cand) + 1):
            reach *= self.p((n, min(k, self.MAX_J)))
            gain += reach * token
            extra = self.n_layers * c.layer_s(rows + k) + c.final_s(rows + k) - base
            if gain - extra > best:
                best_k, best = k, gain - extra
        if best_k == 0:
            self.declined += 1
            for j in range(1, len(cand) + 1):  # fade toward the prior: this kind is tried again later
                cnt = self.counts.get((n, min(j, self.MAX_J)))
                if cnt:
                    cnt[0] *= self.FADE
                    cnt[1] *= self.FADE
            return [], 0
        self.drafted += best_k
        return cand[:best_k], n

    def summary(self) -> dict:
        return {"proposals": self.proposals, "drafted": self.drafted, "declined": self.declined,
                "p": {f"{k[0]}:{k[1]}": round(self.p(k), 3)
                      for k in sorted(self.counts, key=str)}}
