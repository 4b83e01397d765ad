"""Checkpoints written by the installed transformers' own `save_pretrained` decode as transformers' `generate` does.

transformers 5 writes RoPE as one `rope_parameters` object; older versions wrote a top-level `rope_theta` and
`rope_scaling` (and `torch_dtype` for `dtype`). transformers 5 cannot write that older layout, so the "rope_scaling"
checkpoints below are the same save with config.json rewritten into it; transformers is checked to read the
rewrite back to the same tokens, so the rewrite itself is faithful.

Weights are rounded to bf16 before anything else (the loader holds weights in bf16), and the reference runs in
fp32 on those weights, as `make_engine(..., dtype="fp32")` does.
"""
import copy
import json

import pytest
import torch

from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.select import make_engine
from adadecode.model.config import LlamaConfig
from adadecode.model.loader import load_model

from conftest import prepared_hf_model

N_NEW = 48
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # small: scaling acts within 60 positions
ROPES = {"llama3": LLAMA3, "plain": {"rope_type": "default", "rope_theta": 100000.0}}


def hf_model(rope: dict, tied: bool, seed: int = 0):  # seed 0: top-2 margins >= 1.4e-2 in all four
    """A tiny random LlamaForCausalLM (4 query / 2 KV heads), weights rounded to bf16, fp32, eager attention."""
    import transformers

    conf = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, rope_parameters=dict(rope), tie_word_embeddings=tied,
        initializer_range=0.25,  # the default 0.02 gives near-uniform logits, where greedy ties are a coin toss
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(conf).eval()
    return prepared_hf_model(model, tied)


def old_layout(cfg: dict) -> dict:
    """config.json as transformers 4 wrote it: rope_theta and rope_scaling (null without scaling), torch_dtype."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


def save(model, path, layout: str):
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path, max_shard_size="8KB")  # sharded, as big ones are
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 5
    if layout == "rope_scaling":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(old_layout(cfg), indent=2))


def hf_greedy(model, prompt):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=N_NEW, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    top2 = torch.cat(out.logits).float().topk(2, dim=-1).values
    return tokens, (top2[:, 0] - top2[:, 1]).min().item()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_greedy_tokens_match_transformers_generate(tmp_path, layout, rope, tied):
    import transformers

    model = hf_model(ROPES[rope], tied)
    save(model, tmp_path, layout)
    prompt = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    ref, margin = hf_greedy(model, prompt)
    assert len(ref) == N_NEW
    assert margin > 1e-3, f"near-tie in the reference (top-2 margin {margin:.1e}): pick another seed"
    if layout == "rope_scaling":  # transformers reads the rewritten config back to the same model
        again = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                              attn_implementation="eager")
        again.generation_config.eos_token_id = None
        assert hf_greedy(again.eval(), prompt)[0] == ref

    m = load_model(tmp_path)
    assert m.weights.embed.dtype == torch.bfloat16 and (m.weights.lm_head is m.weights.embed) == tied
    got = generate_vanilla(make_engine(m, "torch", device="cpu", dtype="fp32", max_seq=128), prompt, N_NEW).tokens
    first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    assert got == ref, f"greedy tokens differ from transformers' generate from token {first} on"


def test_config_reads_as_transformers_reads_it(tmp_path):
    """Every field of LlamaConfig equals what transformers parsed from the same config.json, in both layouts."""
    import transformers

    for layout in ("rope_parameters", "rope_scaling"):
        path = tmp_path / layout
        save(hf_model(LLAMA3, tied=False), path, layout)
        ours = LlamaConfig.from_file(path / "config.json")
        theirs = transformers.AutoConfig.from_pretrained(path)
        rope = dict(theirs.rope_parameters)
        assert ours.rope_theta == rope.pop("rope_theta")
        assert ours.rope_scaling == rope
        assert (ours.vocab_size, ours.d, ours.n_layers, ours.n_heads, ours.n_kv_heads, ours.head_dim, ours.ffn_dim,
                ours.rms_norm_eps, ours.max_position, ours.tie_word_embeddings, ours.bos_token_id,
                ours.eos_token_ids) == (
            theirs.vocab_size, theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads,
            theirs.num_key_value_heads, theirs.head_dim, theirs.intermediate_size, theirs.rms_norm_eps,
            theirs.max_position_embeddings, theirs.tie_word_embeddings, theirs.bos_token_id, (theirs.eos_token_id,))
