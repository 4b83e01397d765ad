"""bench/latency.py runs end to end on the CPU (the CPU engine, which `auto` picks without a GPU) and writes its JSON
and plot."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_latency_bench_cpu_smoke(default_model, tmp_path):
    from adadecode.engines.head import Head
    from adadecode.heads.files import save_heads

    heads = tmp_path / "heads.safetensors"
    save_heads(heads, [Head.identity(22, default_model.cfg.d), Head.identity(26, default_model.cfg.d)], default_model,
               {"gamma": 0.5, "description": "identity heads (logit lens), smoke test"})
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--heads", str(heads), "--prompts", "general",
                        "--n-prompts", "1", "--max-new-tokens", "6", "--methods", "vanilla,adadecode,layerskip,hf-compile",
                        "--temperatures", "0.7", "--top-k", "40", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engine cpu on the CPU" in r.stderr and "NOT representative" not in r.stderr
    result = json.loads(next(tmp_path.glob("latency-cpu-general-*.json")).read_text())
    assert next(tmp_path.glob("latency-cpu-general-*.png")).stat().st_size > 0
    rows = {row["method"]: row for row in result["methods"]}
    sampled = {"vanilla@T0.7", "adadecode@T0.7", "adadecode-argmax@T0.7", "layerskip@T0.7"}
    assert set(rows) == {"vanilla", "adadecode", "layerskip"} | sampled and "hf-compile" in result["skipped"]
    assert result["sampling"]["top_k"] == 40
    for m in ("adadecode", "layerskip", "adadecode@T0.7", "adadecode-argmax@T0.7", "layerskip@T0.7"):
        assert rows[m]["parity_prompts"] == 1.0
        assert 0 <= rows[m]["acceptance"] <= 1 and rows[m]["ideal_layer_step_speedup"] > 0
    assert {"command", "date", "device", "versions", "model"} <= result.keys()
    assert result["engine"] == "cpu" and result["representative"] and result["read_bandwidth_GBps"] > 0
    # the ideal is the measured step cost's (every step priced, bench/latency.py measures it first), beside the
    # layer-step count's
    assert rows["adadecode"]["ideal_speedup"] > 0
    assert rows["adadecode"]["realized_over_ideal"] == rows["adadecode"]["speedup"] / rows["adadecode"]["ideal_speedup"]
