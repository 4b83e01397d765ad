"""What the benchmarks share: the device-copy ceiling, the byte floor of a decode step, the Llama-3.1-8B shape,
and the run facts (device, versions, date, command) every result records."""
from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

from adadecode.model.config import LlamaConfig

LLAMA31_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}


def llama31_8b() -> LlamaConfig:
    return LlamaConfig.from_hf(LLAMA31_8B, source="Llama-3.1-8B shape")


def copy_bandwidth(gib: float = 1.0, iters: int = 20) -> float:
    """Bytes per second (read + write) of a device-to-device copy of `gib` GiB, after warm-up."""
    n = int(gib * 2**30)
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()  # never time on zeros
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * iters / seconds


def bytes_per_token(cfg: LlamaConfig, context: float) -> int:
    """The least a decode step reads (bf16): every layer weight once, the embedding row, the final norm, the
    LM head, and K and V of `context` positions."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = (q + 2 * kv) * cfg.d + cfg.d * q + 3 * cfg.ffn_dim * cfg.d + 2 * cfg.d
    weights = cfg.n_layers * layer + cfg.d + cfg.vocab_size * cfg.d + cfg.d
    cache = 2 * cfg.n_layers * context * kv
    return int(2 * (weights + cache))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return f"CPU {model} ({platform.machine()}, {cores} cores)"


def run_facts(script: str, argv) -> dict:
    """device, versions, command and date of a run (every result file carries them)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    args = list(argv) if argv is not None else sys.argv[1:]
    return {"command": " ".join([f"python {script}"] + args), "date": now.isoformat(timespec="seconds"),
            "device": device_name(),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}}
