"""Vanilla greedy decoding: equal to transformers' generate on the default model; bad requests refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.cuda import cuda_unavailable_reason
from adadecode.engines.select import auto_engine, make_engine
from adadecode.engines.torch import TorchEngine

from conftest import random_weights

PROMPTS = ["Write a Python function that reverses a string.", "What is the capital of France?",
           "List three uses of a paperclip."]


@pytest.fixture(scope="module")
def hf_default(default_model):
    from transformers import LlamaForCausalLM

    from adadecode.model.loader import default_model_dir

    return LlamaForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32,
                                            attn_implementation="eager").eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers_generate(default_model, hf_default, prompt):
    tok = default_model.tokenizer
    ids = tok.encode_chat(prompt)
    n = 24
    with torch.no_grad():
        ref = hf_default.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=list(default_model.eos_ids),
                                  pad_token_id=default_model.eos_ids[0])[0, len(ids):].tolist()
    engine = TorchEngine(default_model.cfg, default_model.weights, max_seq=256)
    gen = generate_vanilla(engine, ids, n, eos_ids=default_model.eos_ids)
    assert gen.tokens == ref
    assert gen.prompt_tokens == ids


def test_eos_stops_and_is_included(tiny):
    cfg, weights = tiny
    engine = TorchEngine(cfg, weights, max_seq=64)
    free = generate_vanilla(engine, [3, 4, 5], 20)
    assert len(free.tokens) == 20
    eos = free.tokens[6]
    stopped = generate_vanilla(engine, [3, 4, 5], 20, eos_ids=[eos])
    first = free.tokens.index(eos)
    assert stopped.tokens == free.tokens[: first + 1]


def test_streamed_tokens_are_the_output(tiny):
    cfg, weights = tiny
    seen = []
    gen = generate_vanilla(TorchEngine(cfg, weights, max_seq=64), [3, 4, 5], 10, on_token=seen.append)
    assert seen == gen.tokens


@pytest.fixture
def engine(tiny):
    cfg, weights = tiny
    return TorchEngine(cfg, weights, max_seq=16)


def test_empty_prompt_refused(engine):
    with pytest.raises(ValueError, match="empty prompt"):
        generate_vanilla(engine, [], 4)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.prefill([])


def test_prompt_longer_than_context_refused(engine):
    with pytest.raises(ValueError, match="longer than the context"):
        generate_vanilla(engine, list(range(3, 20)), 1)
    with pytest.raises(ValueError, match="longer than the context"):
        generate_vanilla(engine, list(range(3, 14)), 8)  # prompt fits, prompt + new tokens do not
    with pytest.raises(ValueError, match="longer than the context"):
        engine.prefill(list(range(3, 20)))


def test_token_outside_vocabulary_refused(engine):
    with pytest.raises(ValueError, match="token id 97 is outside the vocabulary"):
        generate_vanilla(engine, [1, 97], 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.embed(0, -1)


def test_non_finite_logits_refused(tiny):
    cfg, _ = tiny
    weights = random_weights(cfg)
    weights.layers[1].w_down[0, 0] = float("nan")
    engine = TorchEngine(cfg, weights, max_seq=16)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        generate_vanilla(engine, [1, 2, 3], 2)


def test_kv_cache_that_does_not_fit_is_refused(tiny):
    import dataclasses

    cfg, weights = tiny
    huge = dataclasses.replace(cfg, max_position=1 << 40)
    with pytest.raises(MemoryError, match="KV cache of max_seq=1099511627776"):
        TorchEngine(huge, weights, max_seq=1 << 40)


def test_cuda_engine_says_what_is_missing(default_model):
    why = cuda_unavailable_reason()
    if why is None:
        pytest.skip("the CUDA engine can run here")
    with pytest.raises(RuntimeError, match="the CUDA engine cannot run: .+"):
        make_engine(default_model, "cuda")
    assert make_engine(default_model, "auto", max_seq=64).name == auto_engine() == "cpu"


def run_cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "adadecode", *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_json(default_model):
    r = run_cli("generate", "--model", "default", "--chat", "--prompt", "What is 2+2?", "--max-new-tokens", "6",
                "--json", "--engine", "torch")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"prompt_tokens", "tokens", "text", "ms_per_token", "engine"} <= out.keys()
    assert out["engine"] == "torch" and 1 <= len(out["tokens"]) <= 6
    assert out["text"] == default_model.tokenizer.decode(out["tokens"])


def test_cli_streams_text(default_model):
    r = run_cli("generate", "--model", "default", "--prompt", "The capital of France is", "--max-new-tokens", "5",
                "--engine", "torch")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "ms/token" in r.stderr


def test_cli_bad_model_is_a_clear_error(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--engine", "torch")
    assert r.returncode == 2 and "no such model" in r.stderr
