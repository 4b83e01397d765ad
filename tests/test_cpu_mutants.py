"""The CPU engine's and the driver's tests catch planted changes of arithmetic and rules (issue 32, item 6): each
mutant below is a small change of order, rounding point, window, bias, head norm, lane count, merge, threshold,
verification or budget, and each of its killing tests must FAIL with it (the tests not against the emulated device
are marked; every mutant has at least two killers of which at least one is not against the emulated device).

How (one build for all, no masking): a scratch copy of the project gets every mutant's text replacement at once,
each behind a switch that exists in that copy only -- `(adadecode_mutants::on(N) ? mutated : original)` in C++,
`(mutated if _ada_mutant(N) else original)` in Python -- keyed by ADADECODE_MUTANT (read by the copy's
kernels_for(), so again at every engine and kernel-probe construction; by the driver's copy at every decision).
The product's sources are not touched. One CPU-only build of the copy; then one process runs pytest once per
mutant with exactly that one switch on (the test modules are imported afresh each time; the numpy reference,
which depends on no engine, is computed once: numpy_ref.memo), and once with none on: the control run, which must
pass (the switches off are the original code, and the build is the copy's).

Killing tests are named by node id (MUTANTS below; AGAINST_EMU marks those against the emulated device); a killer
counts only when it ran (its call phase) and failed. The sharp killers are the ones that see fp32 values or inputs
built to expose an order: lane_dot against the numpy order, the attention probes' partials, the absorbing-input
engine test, the cancelling-partials merge. An engine-level bit comparison on random data sees a reordered fp32 sum
only where it flips a bf16 rounding (about once in 2^16 values): C2's killers are such comparisons; they kill it
with the tests' fixed data, and would not be guaranteed to with other data.

Mutants:

  C1  multi-row register tile (x kept, RT > 1): a step pair FMA'd in the other order (the issue's first finding)
  C2  RMSNorm's sum of squares in another order on threads other than the first (the issue's second)
  C3  the Qwen2 bias added after the bf16 rounding, then rounded again (the issue's third)
  C4  the sliding window one position wider (attn_lo)
  C5  the Qwen3 q/k head norm without eps
  C6  the attention chunks merged in reverse order
  C7  a chunk's sum of exps over its lanes in another order
  C8  the dot product's tail step pair FMA'd in the other order, every row count
  C9  the dot product's lane count capped at 2 warps (only reductions longer than 2048 change)
  C10 SiLU x up without rounding silu to bf16
  C11 RoPE: one product not rounded to bf16
  C12 a head's rest logit not rounded to bf16
  C13 LM-head ties across threads go to the highest id
  C14 LM-head ties inside a thread go to the item visited first
  C15 the residual add without rounding the GEMM output to bf16
  D1  an exit when confidence >= gamma (the issue's fourth; the rule is >)
  D2  verification accepts a wrong last guess
  D3  a rejection truncates the cache one row too long
  D4  an exit allowed whose row can yield no output token (budget off by one)
  D5  every head takes the first head's gamma
  D6  the layer segment does not stop at the next head's layer
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

REF = "tests/test_cpu_reference.py::test_engine_is_the_numpy_reference_bit_for_bit"
DOT = "tests/test_cpu_reference.py::test_dot_is_the_documented_order_for_every_loop_and_row_count[portable]"
ABSORB = "tests/test_cpu_reference.py::test_engine_dot_products_follow_the_order_on_absorbing_inputs"
ATTN = "tests/test_cpu_reference.py::test_attention_partials_and_merge_are_the_reference"
ATTN_EMU = "tests/test_cpu_reference.py::test_attention_partials_are_the_emulated_devices"
ATTN_MERGE = "tests/test_cpu_reference.py::test_attention_merge_order_on_cancelling_partials"
EMU = "tests/test_cpu_engine.py::test_matches_the_emulated_cuda_engine_bit_for_bit"
EMU_LONG = "tests/test_cpu_engine.py::test_family_long_context_matches_the_emulated_cuda_engine"
KDOT = "tests/test_cpu_kernels.py::test_dot_is_the_cuda_order"
DRV = "tests/test_driver.py"
RULES = "tests/test_driver_rules.py"

AGAINST_EMU = (EMU, EMU_LONG, ATTN_EMU)  # the killers against the emulated device (E)

KINELS = "csrc/cpu/kernels.inl"
ENGINE = "csrc/cpu/engine.cpp"

# (id, switch number, what, file, kind, original text, mutated text, killing tests)
# kind "expr": the original text is an expression, "stmt": whole statements, "raw": the mutated text holds the
# switch itself ({on}) and reads as the original when the switch is off.
MUTANTS = [
    ("C1", 1, "multi-row tile: a step pair in the other order", KINELS, "stmt",
     "            for (int r = 0; r < RT; ++r) acc[r][c] = vs_fma(wa, xa[r], acc[r][c]);\n"
     "            for (int r = 0; r < RT; ++r) acc[r][c] = vs_fma(wb, xb[r], acc[r][c]);\n",
     "            for (int r = 0; r < RT; ++r) acc[r][c] = RT > 1 ? vs_fma(wa, xa[r], vs_fma(wb, xb[r], acc[r][c]))\n"
     "                                                            : vs_fma(wb, xb[r], vs_fma(wa, xa[r], acc[r][c]));\n",
     # the portable path keeps no activations in registers (vec_portable.h: kFmaXKept): its avx2 tiles are the
     # ones every x86 CI machine runs
     [DOT.replace("[portable]", "[avx2]"), "tests/test_cpu_kernels.py::test_dot_rows_are_batch_invariant[avx2]", ABSORB]),
    ("C2", 2, "RMSNorm's sum of squares in another order on threads other than the first", ENGINE, "expr",
     "k.dot_f32(Ln, t.tmp.data(), t.tmp.data())",
     "(&t == &cx.ws[0] ? k.dot_f32(Ln, t.tmp.data(), t.tmp.data()) : [&] { float s = 0.f; for (int i = 0; i < d; ++i)"
     " s = std::fmaf(t.row[i], t.row[i], s); return s; }())",
     [f"{REF}[loop-llama]", "tests/test_determinism.py::test_every_bit_is_the_same_under_every_pool_schedule"
      "[smollm-shape]"]),
    ("C3", 3, "Qwen2 bias after the bf16 rounding", ENGINE, "stmt",
     "    if (has_bias)\n      for (int c = 0; c < hd; ++c) y[c] = y[c] + bias[c];\n    cx.k.round_bf16(y, y, hd);\n",
     "    cx.k.round_bf16(y, y, hd);\n    if (has_bias)\n      for (int c = 0; c < hd; ++c) y[c] = y[c] + bias[c];\n"
     "    cx.k.round_bf16(y, y, hd);\n",
     [f"{REF}[qwen2-bias-window]", f"{EMU}[qwen2-bias-window]"]),
    ("C4", 4, "sliding window one position wider", "csrc/cpu/kernels.h", "expr",
     "window > 0 && p - window + 1 > 0 ? p - window + 1 : 0", "window > 0 && p - window > 0 ? p - window : 0",
     [f"{REF}[mistral-window]", f"{EMU_LONG}[mistral-window]"]),
    ("C5", 5, "Qwen3 head norm without eps", ENGINE, "expr",
     "inv_sqrt(rn::add(rn::div(ss, static_cast<float>(hd)), m.eps))", "inv_sqrt(rn::div(ss, static_cast<float>(hd)))",
     [f"{REF}[qwen3-qknorm-hd128]", f"{EMU}[qwen3-qknorm-hd128]"]),
    ("C6", 6, "attention chunks merged in reverse order", KINELS, "raw",
     "  for (int c = c0; c < nc; ++c) {\n    const float w = exp2_fixed(ml[2 * c] - M);\n",
     "  for (int c_ = c0; c_ < nc; ++c_) {\n    const int c = {on} ? nc - 1 - (c_ - c0) : c_;\n"
     "    const float w = exp2_fixed(ml[2 * c] - M);\n",
     [f"{REF}[chunks-llama]", f"{ATTN_MERGE}[portable]"]),
    ("C7", 7, "a chunk's sum of exps over its lanes in another order", KINELS, "expr",
     "vadd(vadd(vadd(P[0], P[2]), P[4]), P[6])", "vadd(vadd(P[0], P[2]), vadd(P[4], P[6]))",
     [f"{ATTN}[portable]", ATTN_EMU]),
    ("C8", 8, "dot product tail: a step pair in the other order", KINELS, "expr",
     "vs_fma(wb, vs_load(x[r] + p * 32 + 16 + so), vs_fma(wa, vs_load(x[r] + p * 32 + so), acc[r][c]))",
     "vs_fma(wa, vs_load(x[r] + p * 32 + so), vs_fma(wb, vs_load(x[r] + p * 32 + 16 + so), acc[r][c]))",
     [f"{KDOT}[72-portable]", DOT, ABSORB]),
    ("C9", 9, "dot product lanes capped at 2 warps", "csrc/cpu/lanes.h", "stmt",
     "  if (warps > 8) warps = 8;\n", "  if (warps > 2) warps = 2;\n",
     [f"{KDOT}[2056-portable]", DOT, f"{REF}[loop-llama]", ABSORB]),
    ("C10", 10, "SiLU x up without rounding silu to bf16", KINELS, "expr",
     "vbf16_round(vmul(vbf16_round(silu), uv))", "vbf16_round(vmul(silu, uv))",
     [f"{REF}[hd8-gqa]", f"{EMU}[gqa-untied]"]),
    ("C11", 11, "RoPE: one product not rounded to bf16", KINELS, "expr",
     "vbf16_round(vsub(vbf16_round(vmul(a, c)), vbf16_round(vmul(b, s))))",
     "vbf16_round(vsub(vbf16_round(vmul(a, c)), vmul(b, s)))",
     [f"{REF}[hd8-gqa]", f"{EMU}[gqa-untied]"]),
    ("C12", 12, "a head's rest logit not rounded to bf16", ENGINE, "stmt",
     "    k_.round_bf16(&rest, &rest, 1);\n", "",
     [f"{REF}[hd8-gqa]", f"{EMU}[gqa-untied]"]),
    ("C13", 13, "LM-head ties across threads to the highest id", ENGINE, "expr",
     "t.best_idx[r] < idx", "t.best_idx[r] > idx",
     ["tests/test_determinism.py::test_lm_head_ties_across_items_and_threads_go_to_the_lowest_id[cpu:3:reverse]",
      "tests/test_ties.py::test_ties_in_eight_rows_at_once_go_to_the_lowest_id[portable]"]),
    ("C14", 14, "LM-head ties inside a thread to the item visited first", KINELS, "expr",
     "(t[j] == b && bi >= 0 && base + i + j < bi)", "false",
     ["tests/test_determinism.py::test_lm_head_ties_across_items_and_threads_go_to_the_lowest_id[cpu:1:reverse]",
      "tests/test_ties.py::test_ties_in_eight_rows_at_once_go_to_the_lowest_id[portable]"]),
    ("C15", 15, "residual add without rounding the GEMM output to bf16", KINELS, "expr",
     "vadd(load_any_bf16(h + i, m), vbf16_round(load_any(y + i, m)))",
     "vadd(load_any_bf16(h + i, m), load_any(y + i, m))",
     [f"{REF}[hd8-gqa]", f"{EMU}[gqa-untied]"]),
    ("D1", 101, "exit when confidence >= gamma", "adadecode/decoding/driver.py", "expr",
     "conf > gammas[hi]", "conf >= gammas[hi]",
     [f"{DRV}::test_confidence_must_exceed_gamma", f"{RULES}::test_exits_exactly_when_confidence_exceeds_gamma"]),
    ("D2", 102, "verification accepts a wrong last guess", "adadecode/decoding/driver.py", "expr",
     "f == guess[i]", "f == guess[i] or i == len(guess) - 1",
     [f"{DRV}::test_rollback_at_every_pending_position[3]",
      f"{RULES}::test_every_wrong_guess_is_rejected_and_the_cache_rolled_back[3]"]),
    ("D3", 103, "a rejection truncates the cache one row too long", "adadecode/decoding/driver.py", "expr",
     "(q + 1,)", "(q + 2,)",
     [f"{DRV}::test_rollback_at_every_pending_position[3]",
      f"{RULES}::test_every_wrong_guess_is_rejected_and_the_cache_rolled_back[1]"]),
    ("D4", 104, "an exit whose row can yield no output token", "adadecode/decoding/driver.py", "expr",
     "len(tokens) + pending + 2 <= M", "len(tokens) + pending + 1 <= M",
     [f"{DRV}::test_budget_of_one_two_three_tokens", f"{RULES}::test_exits_fill_the_budget_and_never_pass_it[5]"]),
    ("D5", 105, "every head takes the first head's gamma", "adadecode/decoding/driver.py", "expr",
     "[float(g) for g in gamma]", "[float(gamma[0]) for g in gamma]",
     [f"{DRV}::test_confidence_must_exceed_gamma", f"{RULES}::test_exits_exactly_when_confidence_exceeds_gamma"]),
    ("D6", 106, "the layer segment does not stop at the next head", "adadecode/decoding/driver.py", "expr",
     "min(stop, nxt)", "stop",
     [f"{DRV}::test_oracle_heads_layer_steps_exact", f"{DRV}::test_oracle_heads_deep_chain_segments"]),
]

# the control: the switches off, one test per mutated file and kind (each must pass on the copy)
CONTROL = [DOT, f"{REF}[hd8-gqa]", f"{REF}[chunks-qwen2-window]", f"{REF}[mistral-window]", f"{EMU}[gqa-untied]",
           "tests/test_ties.py::test_ties_in_eight_rows_at_once_go_to_the_lowest_id[portable]",
           f"{RULES}::test_exits_exactly_when_confidence_exceeds_gamma", f"{DRV}::test_oracle_heads_layer_steps_exact"]

CPP_SWITCH = '''#include <cstdlib>
// The mutants' switch (tests/test_cpu_mutants.py): exists in the scratch copy only.
namespace adadecode_mutants {
inline int active = 0;
inline void refresh() { const char* s = std::getenv("ADADECODE_MUTANT"); active = s ? std::atoi(s) : 0; }
inline bool on(int n) { return active == n; }
}  // namespace adadecode_mutants
'''
PY_SWITCH = '''import os as _ada_os


def _ada_mutant(n):  # the mutants' switch (tests/test_cpu_mutants.py): exists in the scratch copy only
    return _ada_os.environ.get("ADADECODE_MUTANT") == str(n)


'''

RUNNER = '''"""Runs pytest once per entry of the plan in this process, ADADECODE_MUTANT set to the entry's switch."""
import json
import os
import sys

import pytest

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")
KEEP = {"conftest", "isa_paths", "numpy_ref"}  # numpy_ref: the engine-free reference, memoized across runs


class Outcomes:
    def __init__(self):
        self.tests = {}

    def pytest_runtest_logreport(self, report):
        t = self.tests.setdefault(report.nodeid, {"ran": False, "failed": False, "error": None, "message": ""})
        if report.when == "call":
            t["ran"] = True
            t["failed"] = report.failed
        elif report.failed:
            t["error"] = report.when
        if report.failed:
            t["message"] = str(report.longrepr)[-1200:]


def main(plan_path, out_path):
    import adadecode
    import adadecode_cpu
    out = {"where": {"adadecode": adadecode.__file__, "adadecode_cpu": adadecode_cpu.__file__}, "runs": {}}
    for run in json.load(open(plan_path)):
        os.environ["ADADECODE_MUTANT"] = str(run["switch"])
        for name, mod in list(sys.modules.items()):
            f = getattr(mod, "__file__", None) or ""
            if f.startswith(TESTS) and name not in KEEP:
                del sys.modules[name]
        o = Outcomes()
        code = pytest.main(["-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                            *run["tests"]], plugins=[o])
        out["runs"][run["id"]] = {"code": int(code), "tests": o.tests}
        json.dump(out, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''


def mutate(text: str, m) -> str:
    mid, n, what, path, kind, old, new, _ = m
    assert text.count(old) == 1, f"mutant {mid} ({what}): its original text is not (once) in {path} any more"
    if path.endswith(".py"):
        assert kind == "expr", mid
        return text.replace(old, f"(({new}) if _ada_mutant({n}) else ({old}))")
    on = f"::adadecode_mutants::on({n})"
    if kind == "expr":
        return text.replace(old, f"({on} ? ({new}) : ({old}))")
    if kind == "stmt":
        return text.replace(old, f"    if ({on}) {{\n{new}    }} else {{\n{old}    }}\n")
    return text.replace(old, new.replace("{on}", on))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    try:
        import adadecode_emu  # noqa: F401  (the E killers run against it)
    except ImportError:
        pytest.skip("adadecode_emu is not built (ADADECODE_BUILD_EMU=0): the emulated-device killers cannot run")
    import adadecode_cpu  # noqa: F401

    tree = tmp_path_factory.mktemp("cpu-mutants")
    for name in ("setup.py", "pytest.ini"):
        shutil.copy2(ROOT / name, tree / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", ".pytest_cache", ".hypothesis")
    for name in ("csrc", "adadecode", "tests"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    texts: dict[str, str] = {}
    for m in MUTANTS:
        path = m[3]
        texts[path] = mutate(texts.get(path) or (tree / path).read_text(), m)
    lanes = texts.get("csrc/cpu/lanes.h") or (tree / "csrc/cpu/lanes.h").read_text()
    texts["csrc/cpu/lanes.h"] = lanes.replace("#pragma once\n", "#pragma once\n" + CPP_SWITCH, 1)
    dispatch = (tree / "csrc/cpu/dispatch.cpp").read_text()
    hook = "const Kernels* kernels_for(const char* isa) {\n"
    assert dispatch.count(hook) == 1, "dispatch.cpp: kernels_for() is not where the switch is read any more"
    texts["csrc/cpu/dispatch.cpp"] = dispatch.replace(hook, hook + "  ::adadecode_mutants::refresh();\n")
    driver = texts["adadecode/decoding/driver.py"]
    at = driver.index("\nHEAD_GUESSES")
    texts["adadecode/decoding/driver.py"] = driver[:at + 1] + PY_SWITCH + driver[at + 1:]
    for path, text in texts.items():
        (tree / path).write_text(text)
    (tree / "run_mutants.py").write_text(RUNNER)

    env = dict(os.environ, ADADECODE_BUILD_CUDA="0", ADADECODE_BUILD_EMU="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("ADADECODE_MUTANT", None)
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"the mutant build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    plan = [{"id": "control", "switch": 0, "tests": CONTROL}]
    plan += [{"id": m[0], "switch": m[1], "tests": m[7]} for m in MUTANTS]
    (tree / "plan.json").write_text(json.dumps(plan))
    # the copy first (adadecode, adadecode_cpu); the worktree after it for adadecode_emu (not rebuilt: unmutated)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(Path(adadecode_emu.__file__).parent)])
    r = subprocess.run([sys.executable, "run_mutants.py", "plan.json", "results.json"], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0 and (tree / "results.json").exists(), f"the mutant runs failed:\n{r.stdout[-4000:]}\n" \
                                                                     f"{r.stderr[-4000:]}"
    out = json.loads((tree / "results.json").read_text())
    for mod, f in out["where"].items():
        assert f.startswith(str(tree)), f"the runs did not use the mutated copy's {mod}: {f}"
    return out["runs"]


def test_control_passes_with_every_switch_off(results):
    run = results["control"]
    bad = {k: v for k, v in run["tests"].items() if not (v["ran"] and not v["failed"] and not v["error"])}
    assert run["code"] == 0 and not bad and len(run["tests"]) == len(CONTROL), \
        f"the copy with every switch off does not pass: {json.dumps(bad, indent=1)[:4000]}"


@pytest.mark.parametrize("mid,n,what,path,kind,old,new,killers", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_killed_by_each_of_its_tests(results, mid, n, what, path, kind, old, new, killers):
    assert len(killers) >= 2 and any(not k.startswith(AGAINST_EMU) for k in killers), "two killers, one not E"
    run = results[mid]
    for k in killers:
        t = run["tests"].get(k)
        assert t is not None, f"mutant {mid} ({what}): {k} did not run (exit {run['code']}): {run['tests'].keys()}"
        assert t["ran"] and t["failed"] and not t["error"], \
            f"mutant {mid} ({what}) survives {k}: {json.dumps(t)[:2000]}"
