"""Argmax ties across LM-head items and threads' shares (issue 32, item 4), beside tests/test_determinism.py: ties at
ids in different 32-column items, 64-column statistics blocks and threads' shares (test_determinism.tied_model:
|h . r| at three ids of one set) go to the lowest id

* in a full-vocabulary head (its token is the statistics' argmax: 64-column blocks folded in order, then the merge
  tree; TorchEngine's head takes torch's argmax of its probabilities), on every engine: TorchEngine, CpuEngine on
  every path this CPU runs x 1, 2, 3 threads under the natural, reversed and shuffled pools, the emulated CUDA engine
  with its blocks in ascending, descending and random order;
* in the final LM head over 8 rows at once (every register tile of the LM head job, each row's running argmax per
  thread merged across threads), on CpuEngine on every path x threads x pool schedule.
"""
from __future__ import annotations

import pytest
import torch

from adadecode.engines.cpu import CpuEngine
from adadecode.engines.head import Head

from test_determinism import EMU_KINDS, build, emu_order, lowest_of_max, tied_model  # noqa: F401 (emu_order: fixture)

adadecode_cpu = pytest.importorskip("adadecode_cpu", reason="adadecode_cpu is not built (see README)")
ISAS = adadecode_cpu.isas()
SCHEDULES = ["natural", "reverse", "shuffle:3"]

pytestmark = pytest.mark.exactness

PROMPT = [1, 2, 5, 9, 11]
ROWS = [40, 7, 650, 333, 690, 300, 3, 8]  # tokens of rows 5..12 (the tied ids among them)


def cpu(isa: str, threads: int, schedule: str, cfg, w, **kw) -> CpuEngine:
    e = CpuEngine(cfg, w, max_seq=64, max_rows=8, threads=threads, isa=isa, schedule=schedule, prefill_chunk=16, **kw)
    assert (e.isa, e.threads) == (isa, threads)
    return e


@pytest.mark.parametrize("kind", ["torch"] + EMU_KINDS + [f"cpu:{isa}" for isa in ISAS])
def test_full_vocabulary_head_ties_go_to_the_lowest_id(kind, emu_order):
    cfg, w = tied_model(seed=5)
    head = [Head.identity(cfg.n_layers, cfg.d)]  # the final norm and the LM head: its logits are final's
    if kind.startswith("cpu:"):
        engines = [cpu(kind[4:], t, s, cfg, w) for t in (1, 2, 3) for s in SCHEDULES]
    else:
        engines = [build(kind, cfg, w, emu_order)]
    for e in engines:
        e.set_heads(head)
        e.prefill(PROMPT + ROWS[:3])
        pos = len(PROMPT) + 2
        want, ids = lowest_of_max(e.final_logits(pos, pos)[0])
        assert len({i // 64 for i in ids}) == 3, f"the tie is not spread over three 64-column blocks: {ids}"
        token, _ = e.head(pos, 0)
        assert token == want, f"{kind}: the head took {token}, the lowest of the tied ids {ids} is {want}"


@pytest.mark.parametrize("isa", ISAS)
def test_ties_in_eight_rows_at_once_go_to_the_lowest_id(isa):
    """Rows 5..12 in one run_layers call and one final: each row's token is the lowest id among its maxima (the
    oracle: this engine's own logits of the row alone, whose bits are those of the row in the batch)."""
    cfg, w = tied_model(seed=7)
    n = len(PROMPT)
    alone = cpu(isa, 1, "natural", cfg, w)
    alone.prefill(PROMPT)
    want, spread = [], 0
    for i, t in enumerate(ROWS):
        alone.embed(n + i, t)
        alone.run_layers(n + i, n + i, 0, cfg.n_layers)
        token, ids = lowest_of_max(alone.final_logits(n + i, n + i)[0])
        spread += len({j // 32 for j in ids}) == 3
        want.append(token)
    assert spread == len(ROWS)  # every row's maximum is a three-item tie
    for threads in (1, 2, 3):
        for schedule in SCHEDULES:
            e = cpu(isa, threads, schedule, cfg, w)
            e.prefill(PROMPT)
            for i, t in enumerate(ROWS):
                e.embed(n + i, t)
            e.run_layers(n, n + len(ROWS) - 1, 0, cfg.n_layers)
            got = e.final(n, n + len(ROWS) - 1)
            assert got == want, f"{isa} x {threads} threads ({schedule}): {got} vs the lowest tied ids {want}"
