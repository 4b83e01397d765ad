"""Trace record/replay: a replayed schedule is a valid engine schedule, bitwise the recorded run."""
import dataclasses

import torch

from adadecode.decoding.driver import generate_adadecode
from adadecode.testing.trace import RecordingEngine, Trace, replay
from adadecode.engines.head import Head
from adadecode.engines.torch import TorchEngine
from adadecode.model.config import LlamaConfig

from conftest import random_weights, tiny_hf_config


def record(tiny, gamma=0.0):
    cfg, weights = tiny
    heads = [Head.identity(1, cfg.d), Head.identity(2, cfg.d)]
    rec = RecordingEngine(TorchEngine(cfg, weights, max_seq=64))
    gen = generate_adadecode(rec, [5, 6, 7, 8], 16, heads=heads, gamma=gamma, max_pending=3)
    trace = Trace(n_layers=cfg.n_layers, head_layers=[h.layer for h in heads], calls=rec.calls,
                  meta={"tokens": len(gen.tokens)})
    return rec.engine, gen, trace


def test_replay_is_bitwise_the_recorded_run(tiny, tmp_path):
    cfg, weights = tiny
    recorded, gen, trace = record(tiny)
    assert gen.stats["early"] > 0 and gen.stats["rejected"] > 0  # gamma 0: every head exits, some are wrong
    assert trace.layer_steps == gen.stats["layer_steps"]
    trace.save(tmp_path / "t.json")
    trace = Trace.load(tmp_path / "t.json")
    fresh = TorchEngine(cfg, weights, max_seq=64)
    fresh.set_heads([Head.identity(layer, cfg.d) for layer in trace.head_layers])
    replay(fresh, trace)
    n = max(recorded.kv_len)
    assert fresh.kv_len == recorded.kv_len
    for layer in range(cfg.n_layers):
        assert torch.equal(fresh.k_cache[layer][:n], recorded.k_cache[layer][:n])


def test_scaled_trace_is_a_valid_schedule_on_a_deeper_model(tiny):
    _, gen, trace = record(tiny)
    deep_cfg = LlamaConfig.from_hf(tiny_hf_config(num_hidden_layers=10))
    deep = TorchEngine(deep_cfg, random_weights(deep_cfg), max_seq=64)
    scaled = trace.scaled(10)
    deep.set_heads([Head.identity(layer, deep_cfg.d) for layer in scaled.head_layers])
    replay(deep, scaled)  # the engine checks every depth and cache precondition
    assert scaled.head_layers == [round(1 * 10 / 4), round(2 * 10 / 4)]
    vanilla = scaled.vanilla()
    replay(deep, vanilla)
    assert vanilla.layer_steps == (gen.stats["tokens"] - 1) * 10
