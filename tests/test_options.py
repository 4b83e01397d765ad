"""EngineOptions (adadecode/engines/options.py): every engine option in one object, each field checked once with its
name (a BadOption carrying it), the environment read in one place, and the same object from the CLI down to the
engine."""
from __future__ import annotations

import pytest

import adadecode
from adadecode import cli
from adadecode.engines.options import EngineOptions, default_threads
from adadecode.errors import BadOption
from conftest import tiny_chat_model


@pytest.mark.parametrize("field,value,says", [
    ("engine", "gpu", "engine must be one of 'auto', 'cuda', 'cpu', 'torch', 'emu', got 'gpu'"),
    ("threads", 0, "threads=0 must be an integer in 1..1024"),
    ("threads", 1025, "threads=1025 must be an integer in 1..1024"),
    ("threads", True, "threads=True must be an integer in 1..1024"),
    ("max_rows", 0, "max_rows=0 must be an integer >= 1"),
    ("prefill_chunk", 0, "prefill_chunk must be an integer >= 1, got 0"),
    ("schedule", "sideways", "schedule='sideways' must be one of natural, reverse, shuffle[:seed]"),
])
def test_each_field_is_checked_once_with_its_name(field, value, says):
    with pytest.raises(BadOption, match=rf"^{__import__('re').escape(says)}$") as e:
        EngineOptions(**{field: value})
    assert e.value.param == field


def test_the_engine_kinds_bounds():
    assert EngineOptions().rows("cpu") == 16 and EngineOptions(max_rows=256).rows("cpu") == 256
    with pytest.raises(BadOption, match="max_rows=257 must be an integer in 1..256 for the CPU engine"):
        EngineOptions(max_rows=257).rows("cpu")
    with pytest.raises(BadOption, match=r"max_rows=17 must be an integer in 1..16 for the CUDA engine \(its"):
        EngineOptions(max_rows=17).rows("emu")
    assert EngineOptions(max_rows=300).rows("torch") == 300
    assert EngineOptions().chunk("cpu") == 64 and EngineOptions().chunk("cuda") == 256
    with pytest.raises(BadOption, match="prefill_chunk must be an integer in 1..1024, got 2000"):
        EngineOptions(prefill_chunk=2000).chunk("cpu")
    with pytest.raises(BadOption, match="dtype='fp32' is the torch engine's option") as e:
        EngineOptions(dtype="fp32").cpu(["portable"])
    assert e.value.param == "dtype"


def test_the_environment_is_read_for_what_is_unset(monkeypatch):
    monkeypatch.setenv("ADADECODE_CPU_THREADS", "3")
    monkeypatch.setenv("ADADECODE_CPU_ISA", "portable")
    monkeypatch.setenv("ADADECODE_CPU_SCHEDULE", "shuffle:4")
    got = EngineOptions().cpu(["avx2", "portable"])
    assert (got["threads"], got["isa"], got["schedule"]) == (3, "portable", ("shuffle", 4))
    got = EngineOptions(threads=2, isa="avx2", schedule="reverse").cpu(["avx2", "portable"])
    assert (got["threads"], got["isa"], got["schedule"]) == (2, "avx2", ("reverse", 0))
    monkeypatch.setenv("ADADECODE_CPU_ISA", "avx512")
    with pytest.raises(BadOption, match="kernels 'avx512' do not run on this CPU") as e:
        EngineOptions().cpu(["avx2", "portable"])
    assert e.value.param == "ADADECODE_CPU_ISA"
    monkeypatch.setenv("ADADECODE_CPU_THREADS", "0")
    with pytest.raises(BadOption, match="ADADECODE_CPU_THREADS='0' must be >= 1") as e:
        default_threads()
    assert e.value.param == "ADADECODE_CPU_THREADS"


def test_the_options_reach_the_engine_from_the_cli_and_the_api():
    args = cli.parser().parse_args(["generate", "--prompt", "x", "--engine", "torch", "--device", "cpu", "--dtype",
                                    "fp32", "--threads", "2"])
    opts = cli._engine_options(args)
    assert opts == EngineOptions(engine="torch", device="cpu", dtype="fp32", threads=2)
    llm = adadecode.LLM(tiny_chat_model(seed=2), engine=opts)
    assert llm.engine_options == opts and llm.engine.name == "torch" and llm.engine.max_rows == 16
    with pytest.raises(BadOption, match="threads=0"):
        adadecode.LLM(tiny_chat_model(seed=2), engine="torch", threads=0)
