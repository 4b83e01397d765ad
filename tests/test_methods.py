"""The registry of decoding methods (adadecode/decoding/methods.py): what the API, the server and the CLI know about
a method comes from its registration, so a method registered there is one that every face takes."""
from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

import adadecode
from adadecode import cli, server
from adadecode.decoding import methods
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.errors import BadOption
from conftest import tiny_chat_model


def test_the_faces_offer_every_registered_method_and_option():
    assert adadecode.METHODS == methods.names() == ("vanilla", "adadecode", "layerskip", "lookup")
    fields = server._Common.model_fields
    assert set(typing.get_args(typing.get_args(fields["method"].annotation)[0])) == set(methods.names())
    for name in ("generate", "serve"):
        sub = cli.parser()._subparsers._group_actions[0].choices[name]
        flags = {a.dest: a for a in sub._actions}
        assert flags["method"].choices == list(methods.names())
        for o in methods.options().values():
            assert o.name in fields and fields[o.name].default is None, o.name  # the server's defaults: the flags'
            if o.type is bool:  # --name / --no-name
                assert isinstance(flags[o.name], argparse.BooleanOptionalAction), o.name
                assert flags[o.name].default == o.default, o.name
            else:
                assert flags[o.name].default == o.default and flags[o.name].type is o.type, o.name
            assert o.flag in flags[o.name].option_strings and o.doc in flags[o.name].help
    assert server.METHOD_FIELDS == ("method", "gamma", "max_pending", "context", "max_chain", "k", "head_layer")


def test_an_option_is_checked_by_its_registration_and_named():
    ctx = methods.Context()
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(BadOption, match="max_pending must be an integer >= 1") as e:
            methods.MAX_PENDING.check(bad, ctx)
        assert e.value.param == "max_pending"
    assert methods.GAMMA.check(None, methods.Context(heads_meta={"gamma": 0.4})) == 0.4
    assert methods.GAMMA.check(None, ctx) == methods.DEFAULT_GAMMA
    with pytest.raises(BadOption) as e:
        methods.GAMMA.check(1.5, ctx)
    assert e.value.param == "gamma"
    with pytest.raises(BadOption, match="method must be one of vanilla, adadecode, layerskip, lookup; got 'beam'"):
        methods.get("beam")
    assert methods.rows_needed({"max_pending": 7, "k": 2}) == 9  # lookup's default max_chain 8: 9 rows
    assert methods.rows_needed({"max_pending": 7, "k": 2, "max_chain": 3}) == 8


def test_registering_a_method_is_all_the_api_needs(monkeypatch):
    """A new method with an option of its own: one registration, and LLM.generate takes it, checks its option and
    reports it; the rows it asks for are held."""
    calls = []

    def generate_twice_checked(engine, prompt_tokens, max_new_tokens, *, eos_ids=(), on_token=None, rounds=1,
                               temperature=0.0, top_k=0, top_p=1.0, seed=0):
        calls.append(rounds)
        return generate_vanilla(engine, prompt_tokens, max_new_tokens, eos_ids, on_token, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)

    rounds = methods.Option("rounds", int, 1, "how many rounds", methods.count("rounds"))
    method = methods.Method("again", generate_twice_checked, "vanilla again", options=(rounds,),
                            rows=lambda v: v["rounds"] + 1, rows_option="rounds")
    monkeypatch.setitem(methods.REGISTRY, "again", method)
    llm = adadecode.LLM(tiny_chat_model(seed=1), engine="torch", device="cpu", dtype="fp32", max_rows=4)
    ref = llm.generate("abc", max_new_tokens=6, method="vanilla")
    out = llm.generate("abc", max_new_tokens=6, method="again", rounds=3)
    assert out.tokens == ref.tokens and out.method == "again" and out.options == {"rounds": 3} and calls == [3]
    assert out.stats["early"] == 0  # not speculative: the API fills the speculative methods' keys
    with pytest.raises(BadOption, match="rounds=4 needs 5 rows in flight; this LLM holds max_rows=4") as e:
        llm.generate("abc", max_new_tokens=6, method="again", rounds=4)
    assert e.value.param == "rounds"
    with pytest.raises(BadOption, match="rounds must be an integer >= 1") as e:
        llm.generate("abc", max_new_tokens=6, method="again", rounds=0)
    assert e.value.param == "rounds"


def test_options_shared_by_two_methods_are_one_option():
    other = dataclasses.replace(methods.MAX_PENDING, default=9)
    with pytest.raises(ValueError, match="register one Option with both"):
        methods.register(methods.Method("clash", generate_vanilla, "x", options=(other,)))
    assert "clash" not in methods.REGISTRY
