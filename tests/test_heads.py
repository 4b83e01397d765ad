"""Heads (docs/design.md#heads): the logit lens, head files and their refusals, the batched generator, training,
and the schedule simulator. Tiny random models, CPU, fast."""
import json

import pytest
import torch

from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.head import Head
from adadecode.engines.torch import TorchEngine
from adadecode.model.math import rms_norm
from adadecode.heads import data as hd, train as ht, schedule_sim as sim, pipeline as th
from adadecode.heads.files import HeadFileError, heads_path, load_heads, save_heads
from adadecode.model.config import LlamaConfig
from adadecode.model.loader import Model

from conftest import random_weights, tiny_hf_config


def tiny_model(seed=0, **over) -> Model:
    cfg = LlamaConfig.from_hf(tiny_hf_config(**over))
    return Model(cfg=cfg, weights=random_weights(cfg, seed=seed), tokenizer=None, source=f"tiny-{seed}")


def rand_prompts(n, vocab, seed=0, prefix=(5, 7, 9)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 2 + int(torch.randint(0, 7, (1,), generator=g))
        out.append(list(prefix) + torch.randint(3, vocab, (k,), generator=g).tolist())
    return out


# ---- the logit lens ---------------------------------------------------------------------------------------------
def test_identity_head_is_exactly_the_logit_lens():
    m = tiny_model()
    eng = TorchEngine(m.cfg, m.weights, max_seq=32)
    eng.set_heads([Head.identity(2, m.cfg.d), Head.identity(2, m.cfg.d, vocab=torch.tensor([3, 10, 50]))])
    eng.prefill([1, 4, 5])
    eng.embed(3, 8)
    eng.run_layers(3, 3, 0, 2)
    x = rms_norm(eng.hidden(3)[None], m.weights.norm, m.cfg.rms_norm_eps)
    lens = x @ m.weights.lm_head.T
    full = Head.identity(2, m.cfg.d)
    assert torch.equal(full.logits(x, m.weights.lm_head), lens.float())
    tok, conf = eng.head(3, 0)
    assert tok == int(lens.argmax()) and conf == pytest.approx(float(torch.softmax(lens, -1).max()), rel=1e-6)
    sub = Head.identity(2, m.cfg.d, vocab=torch.tensor([3, 10, 50]))
    lg = sub.logits(x, m.weights.lm_head)
    assert torch.equal(lg[:, :3], (x @ m.weights.lm_head[[3, 10, 50]].T).float()) and float(lg[0, 3]) == 0.0  # rest logit w_rest = 0


# ---- head files -------------------------------------------------------------------------------------------------
def trained_like_heads(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = m.cfg.d
    h1 = Head(layer=1, T=torch.eye(d) + 0.05 * torch.randn(d, d, generator=g))
    vocab = torch.tensor([2, 3, 7, 40, 96])
    h2 = Head(layer=3, T=torch.eye(d) + 0.05 * torch.randn(d, d, generator=g), vocab=vocab, w_rest=torch.randn(d, generator=g))
    return [h1, h2]


def test_head_file_round_trip(tmp_path):
    m = tiny_model()
    heads = trained_like_heads(m)
    f = tmp_path / "h.safetensors"
    save_heads(f, heads, m, {"gamma": 0.8, "description": "unit test", "training": {"epochs": 2}})
    got, meta = load_heads(str(f), m)
    assert [h.layer for h in got] == [1, 3]
    for a, b in zip(heads, got):
        assert torch.equal(b.T, a.T.half().float())  # T is stored as fp16, bit for bit
        assert (a.vocab is None and b.vocab is None) or torch.equal(a.vocab, b.vocab)
        assert (a.w_rest is None and b.w_rest is None) or torch.equal(a.w_rest, b.w_rest)
    assert meta["gamma"] == 0.8 and meta["layers"] == [1, 3] and meta["description"] == "unit test"
    assert meta["model_fingerprint"] == m.fingerprint and meta["training"] == {"epochs": 2}
    # saving what was loaded is bitwise stable
    f2 = tmp_path / "h2.safetensors"
    save_heads(f2, got, m, {"gamma": 0.8, "description": "unit test"})
    again, _ = load_heads(f2, m)
    assert all(torch.equal(a.T, b.T) for a, b in zip(got, again))


def test_refuses_heads_of_another_model(tmp_path):
    m, other = tiny_model(seed=0), tiny_model(seed=1)
    f = tmp_path / "h.safetensors"
    save_heads(f, trained_like_heads(m), m, {"gamma": 0.8, "description": "x"})
    with pytest.raises(HeadFileError) as e:
        load_heads(f, other)
    msg = str(e.value)
    assert str(f) in msg and m.fingerprint in msg and other.fingerprint in msg and "another model" in msg


def test_refuses_corrupt_file(tmp_path):
    m = tiny_model()
    f = tmp_path / "bad.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(range(200)))
    with pytest.raises(HeadFileError, match=str(f).replace(".", r"\.") + ".*corrupt or truncated"):
        load_heads(f, m)


def test_refuses_truncated_file(tmp_path):
    m = tiny_model()
    f = tmp_path / "h.safetensors"
    save_heads(f, trained_like_heads(m), m, {"gamma": 0.8, "description": "x"})
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(HeadFileError, match="truncated"):
        load_heads(f, m)


def test_refuses_missing_metadata(tmp_path):
    from safetensors.torch import save_file

    m = tiny_model()
    f = tmp_path / "h.safetensors"
    save_file({"head.0.T": torch.eye(m.cfg.d).half()}, str(f),
              metadata={"format": "adadecode-heads", "format_version": "1", "model_fingerprint": m.fingerprint,
                        "d": str(m.cfg.d), "layers": "[2]", "description": "x"})  # no gamma
    with pytest.raises(HeadFileError, match=r"lacks \['gamma'\]"):
        load_heads(f, m)
    save_file({"head.0.T": torch.eye(m.cfg.d).half()}, str(f))  # plain safetensors, not a head file
    with pytest.raises(HeadFileError, match="not an adadecode head file"):
        load_heads(f, m)


def test_refuses_missing_file_and_unknown_default(tmp_path):
    m = tiny_model()
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_heads(tmp_path / "nope.safetensors", m)
    with pytest.raises(ValueError, match="default:code"):
        heads_path("default:poetry")


def test_default_spec_names_the_shipped_files():
    assert heads_path("default") == heads_path("default:general")
    assert heads_path("default:code").name.endswith("code.safetensors")


# ---- the batched generator -----------------------------------------------------------------------------------------
def test_batched_generator_equals_generate_vanilla():
    m = tiny_model()
    prompts = rand_prompts(5, m.cfg.vocab_size) + [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    fwd = hd.BatchedForward(m.cfg, m.weights)
    outs, cap = hd.generate_batched(fwd, prompts, 12, eos_ids=[2], batch_size=4, capture_layers=[2])
    eng = TorchEngine(m.cfg, m.weights, max_seq=64)
    for p, o in zip(prompts, outs):
        assert o == generate_vanilla(eng, p, 12, eos_ids=[2]).tokens
    # the captured rows: one per fed generated token, in (prompt, step) order; y is the next greedy token
    assert len(cap.y) == sum(len(o) - 1 for o in outs)
    assert cap.y.tolist() == [t for o in outs for t in o[1:]]
    # capture = the teacher-forced hidden state at layer 2 (checked on one row against the engine)
    i, s = int(cap.seq[3]), int(cap.step[3])
    seq = prompts[i] + outs[i][:s + 1]
    eng.prefill(seq[:-1])
    pos = len(seq) - 1
    eng.embed(pos, seq[-1])
    eng.run_layers(pos, pos, 0, 2)
    want = rms_norm(eng.hidden(pos)[None], m.weights.norm, m.cfg.rms_norm_eps)[0]
    torch.testing.assert_close(cap.x[2][3].float(), want, atol=2e-3, rtol=2e-3)  # stored as fp16


# ---- training ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [24, 0])
def test_training_lowers_heldout_kl(k):
    m = tiny_model()
    prompts = rand_prompts(24, m.cfg.vocab_size, seed=3)
    fwd = hd.BatchedForward(m.cfg, m.weights)
    conts, cap = hd.generate_batched(fwd, prompts, 16, eos_ids=[], batch_size=12, capture_layers=[2])
    data = {"prompts": prompts, "conts": conts, "cap": cap, "key": {"max_new_tokens": 16}, "seconds": 0.0}
    out = th.train_pipeline(m, data, [2], vocab_k=k, heldout_frac=0.25, epochs=6, lr=3e-3, batch=64,
                            log=lambda s: None, progress=False)
    h = out["results"]["per_head"][0]
    assert h["heldout_kl"] < 0.8 * h["identity_kl"], h
    assert (out["vocab"] is None) == (k == 0)
    best = out["results"]["recommended"]
    assert best["layers"] == [2] and best["ideal_speedup"] >= 1.0 - 1e-9


def test_build_vocab_and_collapse_target():
    v = ht.build_vocab([[5, 5, 6, 7], [7, 7, 9]], 2, 97)
    assert v.tolist() == [5, 7]
    assert ht.build_vocab([[1]], 0, 97) is None
    tp = torch.tensor([[0.5, 0.3, 0.1]])
    ti = torch.tensor([[7, 8, 5]])
    tgt = ht.collapse_target(tp, ti, v, 97)
    torch.testing.assert_close(tgt, torch.tensor([[0.1, 0.5, 0.4]]))  # ids 5, 7, then rest = 0.3 + tail 0.1


# ---- the simulator ---------------------------------------------------------------------------------------------
def trace(rows):
    """rows: per row, per head: '.' not confident, 'c' confident and correct, 'w' confident and wrong."""
    conf = torch.tensor([[ch != "." for ch in r] for r in rows], dtype=torch.float32)
    corr = torch.tensor([[ch == "c" for ch in r] for r in rows])
    return conf, corr


def test_simulator_no_exits_is_vanilla():
    conf, corr = trace(["..", "..", ".."])
    s = sim.simulate(conf, corr, [10, 20], 0.5, 30)
    assert s["steps"] == s["vanilla_steps"] == 90 and s["head_evals"] == 6


def test_simulator_correct_exits():
    # row 0 exits at 10, row 1 at 20, row 2 runs to 30 (carrying both to 30): 10 + 20 + 30
    conf, corr = trace(["c.", ".c", ".."])
    assert sim.simulate(conf, corr, [10, 20], 0.5, 30)["steps"] == 60
    # the last rows exit early: flushed to L from the shallowest pending depth: 10 + 10 + (30 - 10)
    conf, corr = trace(["c.", "c."])
    assert sim.simulate(conf, corr, [10, 20], 0.5, 30)["steps"] == 40


def test_simulator_rollback_and_max_pending():
    # row 0 exits wrongly at 10; garbage row 1 (confident like the trace row 1) exits at 20; garbage row 2 runs
    # to 30 and reveals the error: 10 + 20 + 30. Then row 1 again (exits at 20), row 2 runs to 30.
    conf, corr = trace(["w.", ".c", ".."])
    s = sim.simulate(conf, corr, [10, 20], 0.5, 30)
    assert s["steps"] == 10 + 20 + 30 + 20 + 30 and s["wrong"] == 1
    # max_pending=1: a second early exit must wait for verification
    conf, corr = trace(["c.", "c.", "c."])
    assert sim.simulate(conf, corr, [10, 20], 0.5, 30, max_pending=1)["steps"] == 10 + 30 + 10 + 20
    res = sim.simulate_set([trace(["c.", "..", ".."])], [10, 20], 0.5, 30)
    assert res["ideal_speedup"] == pytest.approx(90 / 70)


def test_parse_layers():
    assert th.parse_layers("18,20-22, 26") == [18, 20, 21, 22, 26]


# ---- shipped heads ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["default", "default:code", "default:general"])
def test_shipped_heads_load_for_the_default_model(spec, default_model):
    if not heads_path(spec).is_file():
        pytest.skip(f"{heads_path(spec)} not shipped in this checkout")
    heads, meta = load_heads(spec, default_model)
    assert heads and 0 < meta["gamma"] < 1 and meta["layers"] == [h.layer for h in heads]
    assert all(1 <= h.layer < default_model.cfg.n_layers for h in heads)
    assert meta["description"]


class _StubTokenizer:
    eos_id = None

    def encode(self, text):
        return [1] + [3 + (ord(c) % 90) for c in text]

    def encode_chat(self, text):
        return [1, 5, 7] + self.encode(text)[1:]


def test_cli_train_heads_end_to_end(tmp_path, monkeypatch, capsys):
    import adadecode.model.loader
    from adadecode.cli import main

    m = tiny_model()
    m.tokenizer = _StubTokenizer()
    monkeypatch.setattr(adadecode.model.loader, "load_model", lambda spec: m)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([f"prompt number {i} says {'ab' * (i % 5)}" for i in range(10)]))
    out, res = tmp_path / "h.safetensors", tmp_path / "r.json"
    rc = main(["train-heads", "--model", "tiny", "--layers", "1-3", "--prompts", str(prompts), "--out", str(out),
               "--max-new-tokens", "8", "--vocab", "30", "--epochs", "1", "--results", str(res), "--max-heads", "2",
               "--data-cache", str(tmp_path / "cache.pt")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "recommended: layers" in text
    heads, meta = load_heads(out, m)
    r = json.loads(res.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert meta["layers"] == r["recommended"]["layers"] and meta["gamma"] == r["recommended"]["gamma"]
    assert len(r["per_head"]) == 3 and "prompts" in meta["description"]
    # a second run reuses the generated data
    rc = main(["train-heads", "--model", "tiny", "--layers", "2", "--prompts", str(prompts), "--out", str(out),
               "--max-new-tokens", "8", "--vocab", "30", "--epochs", "1", "--data-cache", str(tmp_path / "cache.pt")])
    assert rc == 0 and "reusing generated data" in capsys.readouterr().out


def test_recommend_respects_min_accuracy():
    # layer 10 exits on every row but is wrong on every tenth; layer 20 exits on every row and is always right
    n = 40
    per = {10: (torch.ones(n), torch.arange(n) % 10 != 9), 20: (torch.ones(n), torch.ones(n, dtype=torch.bool))}
    seq = torch.zeros(n, dtype=torch.long)
    best, _ = sim.recommend(per, seq, 30, gammas=(0.5,), max_heads=1)
    assert best["layers"] == [10] and best["early_accuracy"] < 0.95  # a few rollbacks cost less than exiting at 20
    best, _ = sim.recommend(per, seq, 30, gammas=(0.5,), max_heads=1, min_accuracy=0.95)
    assert best["layers"] == [20] and best["early_accuracy"] == 1.0


# ---- the sharded data cache ---------------------------------------------------------------------------------------
def test_shard_cache_resumes_and_matches_the_generator(tmp_path):
    m = tiny_model()
    prompts = rand_prompts(7, m.cfg.vocab_size, seed=5)
    recs = [{"ids": p, "split": "val" if i % 3 == 0 else "train"} for i, p in enumerate(prompts)]
    cache = hd.ShardCache(tmp_path / "c", m, [1, 2], 6, topk=8, batch=3)
    cache.build(recs, log=lambda s: None)
    shards = sorted((tmp_path / "c").glob("shard-*.safetensors"))
    assert len(shards) == 3
    shards[1].unlink()  # an interrupted build: the next one makes only the missing shard
    made = []
    st = cache.build(recs, log=made.append)
    assert "2 of 3 shards present, 1 to make" in made[0] and st["tokens"] > 0
    data = cache.load([2])
    conts, cap = hd.generate_batched(hd.BatchedForward(m.cfg, m.weights), prompts, 6, m.eos_ids, batch_size=7,
                                     capture_layers=[2], topk=8)
    assert data["conts"] == conts
    assert torch.equal(data["cap"].seq, cap.seq) and torch.equal(data["cap"].y, cap.y)
    torch.testing.assert_close(data["cap"].x[2].float(), cap.x[2].float(), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        hd.ShardCache(tmp_path / "c", m, [1, 2], 7, topk=8, batch=3).build(recs, log=lambda s: None)
    with pytest.raises(ValueError, match=r"no hidden states at layers \[3\]"):
        cache.load([3])
    # a split by construction: training never sees the validation prompts
    out = th.train_pipeline(m, hd.merge_data([data]), [2], vocab_k=0, epochs=1, log=lambda s: None, progress=False,
                            per_head_gamma=True)
    assert out["results"]["prompts"]["heldout"] == sum(r["split"] == "val" for r in recs)
    assert out["results"]["recommended"]["speedup_with_head_cost"] >= out["results"]["recommended_shared_gamma"]["speedup_with_head_cost"]


# ---- prompts from real sources --------------------------------------------------------------------------------------
def test_code_prompts_come_from_documented_functions(tmp_path):
    from adadecode.heads import prompts as hp

    src = tmp_path / "mod.py"
    src.write_text('from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n    """Return the sum of all the '
                   'numbers in xs, or zero for an empty list."""\n    return sum(xs)\n\n\ndef undocumented(x):\n    return x\n\n\n'
                   'class C:\n    def method(self):\n        """A method reads oddly without its class: skipped."""\n')
    found = list(hp.functions_in(src))
    assert [f[0] for f in found] == ["add_all"]
    name, text, doc, imports = found[0]
    assert text.startswith("def add_all(xs: List[int]) -> int:") and text.rstrip().endswith('list."""')
    assert imports == "from typing import List"


def test_near_duplicates_of_the_evaluation_set_are_found():
    from adadecode.heads import prompts as hp

    ref = 'def has_close_elements(numbers, threshold):\n    """ Check if in given list of numbers, are any two numbers closer ' \
          'to each other than given threshold."""\n'
    idx = hp.ShingleIndex([ref])
    assert idx.near(ref.replace("numbers", "numbers ").replace("def ", "async def "))
    assert not idx.near('def parse(url):\n    """Split a URL into its scheme, host, path and query string parts."""\n')
    assert hp.near_duplicates(["x", ref], [ref]) == [(1, 1.0)]


# ---- ablation parts ------------------------------------------------------------------------------------------------
def test_ablation_parts_start_as_the_plain_head_and_are_not_saved(tmp_path):
    m = tiny_model()
    d = m.cfg.d
    x = torch.randn(4, d)
    prev = torch.randn(4, d)
    plain = Head.identity(2, d)
    h = Head(layer=2, T=torch.eye(d), W1=torch.randn(8, d), W2=torch.zeros(d, 8), P1=torch.randn(8, d), P2=torch.zeros(d, 8))
    assert torch.equal(h.logits(x, m.weights.lm_head, prev), plain.logits(x, m.weights.lm_head))
    with pytest.raises(ValueError, match="previous token"):
        h.logits(x, m.weights.lm_head)
    with pytest.raises(ValueError, match="ablations"):
        save_heads(tmp_path / "h.safetensors", [h], m, {"gamma": 0.5, "description": "x"})


def test_per_head_gammas_in_a_head_file(tmp_path):
    m = tiny_model()
    heads = trained_like_heads(m)
    f = tmp_path / "h.safetensors"
    save_heads(f, heads, m, {"gamma": 0.7, "gammas": [0.6, 0.9], "description": "x"})
    _, meta = load_heads(f, m)
    assert meta["gammas"] == [0.6, 0.9] and meta["gamma"] == 0.7
    save_heads(f, heads, m, {"gamma": 0.7, "gammas": [0.6], "description": "x"})
    with pytest.raises(HeadFileError, match="'gammas'"):
        load_heads(f, m)


# ---- issue 35: train-heads killed while it writes -----------------------------------------------------------------
KILLED_TRAIN = """
import json, os, signal, sys
from adadecode.cli import main

point = sys.argv[1]
if point == "results":  # in the results JSON's write: json.dump into the open file, or json.dumps before it
    def dying(real):
        def dump(obj, *a, **k):
            if isinstance(obj, dict) and "simulations" in obj and "recommended" in obj:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, *a, **k)
        return dump
    json.dump, json.dumps = dying(json.dump), dying(json.dumps)
elif point == "heads":  # the heads file written out, not yet in place
    import safetensors.torch
    real = safetensors.torch.save_file
    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if "adadecode-heads" in str(metadata):
            os.kill(os.getpid(), signal.SIGKILL)
    safetensors.torch.save_file = save_file
sys.exit(main(sys.argv[2:]))
"""


def test_train_heads_killed_while_writing_leaves_whole_files_or_none(tmp_path):
    """Issue 35: a SIGKILL just after the results JSON was created left a 0-byte results.json beside a complete
    heads file, and one during the heads write left a `*.tmp` that nothing cleaned. Now a kill in either write
    leaves that file absent (never partial), and the next run leaves the folder holding its outputs alone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from adadecode.model.loader import load_model, write_hf_dir
    from conftest import tiny_chat_model

    root = Path(__file__).resolve().parent.parent
    write_hf_dir(tiny_chat_model(seed=2), tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "p.json").write_text(json.dumps([f"prompt {i} says {'ab' * (i % 5)}" for i in range(8)]))
    heads, res = out / "h.safetensors", out / "results.json"
    args = ["train-heads", "--model", str(tmp_path / "model"), "--layers", "1-3", "--prompts", str(out / "p.json"),
            "--out", str(heads), "--results", str(res), "--max-new-tokens", "6", "--vocab", "30", "--epochs", "1",
            "--max-heads", "2", "--data-cache", str(out / "cache.pt")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))

    def run(point: str) -> int:
        return subprocess.run([sys.executable, "-c", KILLED_TRAIN, point, *args], env=env, capture_output=True,
                              timeout=300).returncode

    assert run("heads") == -9
    assert not heads.exists() and not res.exists()
    assert run("results") == -9
    model = load_model(tmp_path / "model")
    load_heads(heads, model)  # whole
    assert not res.exists()  # not a 0-byte file
    assert run("none") == 0
    assert json.loads(res.read_text())["recommended"]["layers"] == load_heads(heads, model)[1]["layers"]
    assert sorted(p.name for p in out.iterdir()) == ["cache.pt", "h.safetensors", "p.json", "results.json"]


def test_an_append_cut_by_a_kill_is_dropped_from_the_requests_log(tmp_path):
    """recipe.general_set appends one JSON line per model-written request and resumes from the file: a run killed
    mid-line left a last line without its newline, and the next run failed to parse it. It is cut off the file,
    so the next appends start on their own line."""
    from adadecode.heads.recipe import _complete_lines

    f = tmp_path / "requests.jsonl"
    f.write_text('{"topic": "a", "reply": "x"}\n{"topic": "b", "reply": "y"}\n{"topic": "c", "re')
    assert _complete_lines(f) == [{"topic": "a", "reply": "x"}, {"topic": "b", "reply": "y"}]
    assert f.read_text() == '{"topic": "a", "reply": "x"}\n{"topic": "b", "reply": "y"}\n'
    assert _complete_lines(tmp_path / "none.jsonl") == []
