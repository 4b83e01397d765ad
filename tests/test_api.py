"""adadecode.LLM: one entry point for loading and decoding (text and tokens, streamed or not, stop strings, cancel)."""
from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adadecode
from adadecode.api import TextStream
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.head import Head
from adadecode.engines.torch import TorchEngine
from adadecode.heads.files import save_heads
from adadecode.model.tokenizer import StreamDecoder, Tokenizer
from conftest import tiny_chat_model


@pytest.fixture(scope="module")
def model():
    return tiny_chat_model(seed=0, max_position_embeddings=8192)


@pytest.fixture(scope="module")
def llm(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "identity.safetensors"
    save_heads(path, [Head.identity(1, model.cfg.d), Head.identity(3, model.cfg.d)], model,
               {"gamma": 0.02, "description": "identity heads"})
    return adadecode.LLM(model, heads=str(path), engine="torch", device="cpu", dtype="fp32")


def test_generate_is_vanilla_greedy_for_every_method(llm, model):
    prompt = model.tokenizer.encode("Grüße aus Köln")
    ref = generate_vanilla(TorchEngine(model.cfg, model.weights, max_seq=128), prompt, 30, eos_ids=model.eos_ids)
    for method in adadecode.METHODS:
        out = llm.generate("Grüße aus Köln", max_new_tokens=30, method=method)
        assert out.tokens == ref.tokens and out.prompt_tokens == prompt, method
        assert out.text == model.tokenizer.decode(ref.tokens) and out.method == method
        assert out.finish_reason == ("stop" if ref.tokens[-1] in model.eos_ids else "length")
        assert {"tokens", "early", "accepted", "rejected", "layer_steps"} <= out.stats.keys()
    assert llm.generate(prompt, max_new_tokens=30).tokens == ref.tokens  # token ids in, the heads' method by default
    assert llm.generate("Grüße aus Köln", max_new_tokens=30).method == "adadecode"
    out = llm.generate("Grüße aus Köln", max_new_tokens=30, method="adadecode")
    assert out.options == {"heads": llm.heads_spec, "head_layers": [1, 3], "gamma": 0.02, "max_pending": 5}
    assert out.stats["early"] > 0


def test_chat_messages_and_chat_prompt(llm, model):
    msgs = [{"role": "user", "content": "hi ✓"}]
    a = llm.generate(messages=msgs, max_new_tokens=12, method="vanilla")
    b = llm.generate("hi ✓", chat=True, max_new_tokens=12, method="vanilla")
    assert a.prompt_tokens == b.prompt_tokens == model.tokenizer.encode_messages(msgs) and a.tokens == b.tokens


def test_stream_pieces_make_the_text(llm):
    ref = llm.generate("über", max_new_tokens=40, method="adadecode")
    pieces = list(llm.stream("über", max_new_tokens=40, method="adadecode"))
    assert "".join(p.text for p in pieces) == ref.text
    assert [t for p in pieces for t in p.tokens] == ref.tokens
    assert pieces[-1].completion is not None and pieces[-1].finish_reason == ref.finish_reason
    assert all(p.completion is None for p in pieces[:-1]) and len(pieces) > 2


def test_stop_strings_cut_the_text(llm):
    ref = llm.generate("abc", max_new_tokens=40, method="vanilla")
    i = next(i for i in range(2, len(ref.text) - 3) if "\ufffd" not in ref.text[i:i + 3])
    stop = ref.text[i:i + 3]
    cut = ref.text[:ref.text.find(stop)]
    for method in adadecode.METHODS:
        out = llm.generate("abc", max_new_tokens=40, method=method, stop=["\x00never", stop])
        assert out.text == cut and out.finish_reason == "stop" and out.stop == stop
        assert out.tokens == ref.tokens[:len(out.tokens)] and len(out.tokens) < len(ref.tokens)
        assert "".join(p.text for p in llm.stream("abc", max_new_tokens=40, method=method, stop=stop)) == cut


def test_text_stream_holds_back_a_possible_stop_string(model):
    tok = model.tokenizer
    ts = TextStream(tok, ["cat", "dog"])
    shown = [ts.push(t) for t in tok.encode("a ca", add_special=False)]
    assert "".join(shown) == "a "  # "ca" may begin "cat"
    shown += [ts.push(t) for t in tok.encode("rd do", add_special=False)]
    assert "".join(shown) == "a card "
    shown += [ts.push(t) for t in tok.encode("gma", add_special=False)]
    assert "".join(shown) == "a card " and ts.hit == "dog" and ts.text == "a card "
    ts = TextStream(tok, ["cat"])
    assert "".join(ts.push(t) for t in tok.encode("x c", add_special=False)) + ts.finish() == "x c"


class _Pieces:
    """Stands in for the StreamDecoder: token i decodes to pieces[i] (any text, split anywhere)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, token: int) -> str:
        return self.pieces[token]

    def flush(self) -> str:
        return ""


def first_stop(text: str, stop: list[str]):
    """(where the text is cut, the stop string) by the definition: the stop string completed first in the text
    (the one ending earliest; of two ending together, the longer), or None."""
    found = [(i + len(s), -len(s), i, s) for s in stop if (i := text.find(s)) >= 0]
    return min(found)[2:] if found else None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(alphabet="abc", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=12),
       stop=st.lists(st.text(alphabet="ab", min_size=1, max_size=6), min_size=1, max_size=4))
def test_text_stream_cuts_at_the_first_stop_string_however_the_text_is_split(text, cuts, stop):
    """The matcher (KMP per stop string, issue 35) against the definition, the text split into pieces anywhere:
    the same cut whatever the split, and what is shown is never more than the cut text, holding back exactly the
    longest end of the text that begins a stop string."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    ts = TextStream(None, stop)
    ts.decoder = _Pieces(pieces)
    shown, seen = "", ""
    for i, piece in enumerate(pieces):
        shown += ts.push(i)
        seen += piece
        if ts.hit is None:
            held = max((k for s in stop for k in range(1, len(s)) if seen.endswith(s[:k])), default=0)
            assert shown == seen[:len(seen) - held]
    shown += ts.finish()
    want = first_stop(text, stop)
    cut = text if want is None else text[:want[0]]
    assert (shown, ts.text, ts.hit) == (cut, cut, None if want is None else want[1])


def test_a_stop_string_of_megabytes_costs_nothing_per_token(model):
    """Issue 35's freeze: one stop string of 3.9 MB made each token cost O(len(s)^2) (4 tokens with 400k characters:
    3.26 s; 3.9 MB: never done). 300 tokens that all continue it: within 5 s (the old matcher would take hours),
    every one of them held back, then shown at the end."""
    import time

    tok = model.tokenizer
    q = tok.encode("q", add_special=False)
    assert len(q) == 1
    t0 = time.monotonic()
    ts = TextStream(tok, ["q" * 3_900_000, "x" * 1_000_000 + "q"])
    assert "".join(ts.push(q[0]) for _ in range(300)) == ""
    assert ts.finish() == "q" * 300 and ts.hit is None
    assert time.monotonic() - t0 < 5


def test_stop_strings_are_bounded(llm):
    """At most MAX_STOP_STRINGS strings and MAX_STOP_BYTES bytes (UTF-8) in all; the bounds themselves pass."""
    from adadecode.api import MAX_STOP_BYTES, MAX_STOP_STRINGS

    ok = ["é" * (MAX_STOP_BYTES // 2 // MAX_STOP_STRINGS)] * MAX_STOP_STRINGS
    assert llm.prepare("hi", max_new_tokens=2, stop=ok).stop == ok
    for stop, words in (([f"s{i}" for i in range(MAX_STOP_STRINGS + 1)], f"stop holds {MAX_STOP_STRINGS + 1} strings"),
                        (["é" * (MAX_STOP_BYTES // 2) + "x"], f"stop strings hold {MAX_STOP_BYTES + 1} bytes"),
                        ("q" * 3_900_000, "stop strings hold 3900000 bytes"), (5, "stop must be a string or a list"),
                        ([b"x"], "stop must be non-empty strings")):
        with pytest.raises(ValueError, match=words):
            llm.prepare("hi", max_new_tokens=2, stop=stop)


def metaspace_tokenizer() -> Tokenizer:
    """A Llama-2 style (SentencePiece BPE with byte fallback) tokenizer: the leading space of a text is dropped."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    pieces = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "▁", "a", "é"] + [f"<0x{b:02X}>" for b in range(256)]
    hf = HFTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return Tokenizer(hf.to_str(), {"bos_token": "<s>", "eos_token": "</s>"})


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_stream_decoder_pieces_concatenate_to_the_decoded_text(data):
    kind = data.draw(st.sampled_from(["bytes", "metaspace"]))
    tok = tiny_chat_model().tokenizer if kind == "bytes" else metaspace_tokenizer()
    # valid text with special tokens mixed in; with byte-level BPE, also any bytes (a byte-fallback decoder turns a
    # whole run of byte tokens into U+FFFDs when the run is not valid UTF-8, which no stream can foresee)
    text = data.draw(st.text(alphabet=st.sampled_from("aé€ ✓\n"), max_size=12))
    ids = tok.encode(text, add_special=False)
    ids += data.draw(st.lists(st.integers(0, tok.vocab_size - 1 if kind == "bytes" else 2), max_size=6))
    ids = data.draw(st.permutations(ids)) if kind == "bytes" and data.draw(st.booleans()) else ids
    dec = StreamDecoder(tok)
    pieces = [dec.push(t) for t in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids)


def test_a_multibyte_character_comes_out_whole(model):
    tok = model.tokenizer
    ids = tok.encode("€✓", add_special=False)
    assert len(ids) == 6
    dec = StreamDecoder(tok)
    assert [dec.push(t) for t in ids] == ["", "", "€", "", "", "✓"]


def test_cancel_frees_the_engine(llm):
    ref = llm.generate("ping", max_new_tokens=20, method="vanilla")
    cancel, seen = threading.Event(), []

    def on_text(d):
        seen.append(d)
        if len(seen) == 3:
            cancel.set()

    with pytest.raises(adadecode.Cancelled) as e:
        llm.generate("ping", max_new_tokens=4000, method="adadecode", on_text=on_text, cancel=cancel)
    assert e.value.tokens == len([t for d in seen for t in d.tokens]) < 4000
    stream = llm.stream("ping", max_new_tokens=4000, method="vanilla")
    first = [next(stream) for _ in range(2)]
    stream.close()  # cancels and waits: the engine is free when close returns
    assert llm._lock.acquire(blocking=False)
    llm._lock.release()
    assert first[0].completion is None
    assert llm.generate("ping", max_new_tokens=20, method="vanilla").tokens == ref.tokens


def test_the_engine_grows_unless_fixed(llm, model):
    """max_seq / max_rows None: the engine is rebuilt to fit a request (same code path for both); fixed: refused."""
    ref = llm.generate("hello", max_new_tokens=30, method="adadecode")
    grown = adadecode.LLM(model, heads=llm.heads_spec, engine="torch", device="cpu", dtype="fp32")
    assert grown.engine.max_seq == 4096 and grown.engine.max_rows == 16
    out = grown.generate("hello", max_new_tokens=30, method="adadecode", max_pending=20)
    assert grown.engine.max_rows == 21 and out.tokens == ref.tokens
    fixed = adadecode.LLM(model, heads=llm.heads_spec, engine="torch", device="cpu", dtype="fp32", max_seq=64,
                          max_rows=16)
    with pytest.raises(ValueError, match="longer than the context"):
        fixed.generate([5] * 60, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_pending=20 needs 21 rows"):
        fixed.generate("hello", max_new_tokens=30, method="adadecode", max_pending=20)


def test_bad_requests_are_value_errors(llm, model):
    bare = adadecode.LLM(model, engine="torch", device="cpu", dtype="fp32", max_rows=4)
    cases = [
        (dict(prompt="hi", max_new_tokens=4, method="layerskip"), bare, "needs intermediate heads"),
        (dict(prompt="hi", max_new_tokens=4, method="adadecode", max_pending=4), bare, "needs intermediate heads"),
        (dict(prompt="hi", max_new_tokens=4, method="beam"), llm, "method must be one of"),
        (dict(prompt="hi", max_new_tokens=4, no_such_option=1), llm, "takes no option 'no_such_option'"),
        (dict(prompt="hi", max_new_tokens=4, eos_ids=[1]), llm, "takes no option 'eos_ids'"),
        (dict(prompt="hi", max_new_tokens=0), llm, "max_new_tokens must be >= 1"),
        (dict(prompt="", max_new_tokens=4), llm, "empty prompt"),
        (dict(prompt=[], max_new_tokens=4), llm, "empty prompt"),
        (dict(prompt=[10**6], max_new_tokens=4), llm, "outside the vocabulary"),
        (dict(prompt="hi", max_new_tokens=4, stop=[""]), llm, "stop must be non-empty"),
        (dict(prompt="hi", max_new_tokens=4, method="adadecode", gamma=2.0), llm, "gamma must be"),
        (dict(prompt="hi", max_new_tokens=4, method="adadecode", max_pending=0), llm, "max_pending must be"),
        (dict(prompt="hi", max_new_tokens=4, method="layerskip", head_layer=2), llm, "head_layer 2"),
        (dict(prompt="hi", messages=[{"role": "user", "content": "x"}], max_new_tokens=4), llm, "either a prompt or"),
    ]
    for kwargs, target, msg in cases:
        with pytest.raises(ValueError, match=msg):
            target.generate(**kwargs)


def test_a_model_without_tokenizer_decodes_token_ids(model):
    import dataclasses

    bare = adadecode.LLM(dataclasses.replace(model, tokenizer=None), engine="torch", device="cpu", dtype="fp32")
    ref = adadecode.LLM(model, engine="torch", device="cpu", dtype="fp32").generate([1, 40, 41], max_new_tokens=6)
    out = bare.generate([1, 40, 41], max_new_tokens=6)
    assert out.tokens == ref.tokens and out.text == ""
    pieces = list(bare.stream([1, 40, 41], max_new_tokens=6))
    assert [t for p in pieces for t in p.tokens] == ref.tokens and len(pieces) == len(ref.tokens) + 1
    for kwargs, msg in ((dict(prompt="hi"), "no tokenizer.json"), (dict(prompt=[1], stop="x"), "stop strings need")):
        with pytest.raises(ValueError, match=msg):
            bare.generate(max_new_tokens=4, **kwargs)


def test_requests_together_on_the_cpu_engine_get_their_tokens_alone(llm, model):
    """LLM(engine="cpu", max_seqs=4) (issue 36): 6 requests from 6 threads (every method, one seeded sampling) share
    the CPU engine's steps (its sequences: run_batch, final_batch); each gets the tokens it gets alone."""
    kinds = [dict(method="vanilla"), dict(method="adadecode"), dict(method="lookup"),
             dict(method="adadecode", context=True), dict(method="layerskip"),
             dict(method="vanilla", temperature=0.8, seed=5)]
    prompts = ["Grüße aus Köln", "hello", "1 2 3 4 1 2 3 4", "abc", "The quick brown fox", "zz top"]
    solo = adadecode.LLM(model, heads=llm.heads_spec, engine="cpu", threads=1, max_seq=256)
    want = [solo.generate(p, max_new_tokens=24, **k).tokens for p, k in zip(prompts, kinds)]
    batched = adadecode.LLM(model, heads=llm.heads_spec, engine="cpu", threads=1, max_seq=256, max_seqs=4)
    engine, mixed = batched.engine, []
    run_batch = engine.run_batch
    engine.run_batch = lambda segments: (mixed.append(len({s[0] for s in segments}) > 1), run_batch(segments))[1]
    go = threading.Barrier(len(prompts))
    got, errors = {}, []

    def ask(i):
        try:
            go.wait(timeout=60)
            got[i] = batched.generate(prompts[i], max_new_tokens=24, **kinds[i]).tokens
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        batched.close()
    assert not errors and [got.get(i) for i in range(len(prompts))] == want
    assert engine.name == "cpu" and engine.max_seqs == 4 and any(mixed)  # steps with rows of several requests
