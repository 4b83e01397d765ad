"""CPU-runnable checks of the extension's surface: it imports without a GPU and exposes every op with the
documented signature (argument names, order and defaults). The kernels themselves are tested in
test_kernels.py."""
from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")  # loads libc10/libtorch, which the extension links against


def ext(name: str):
    """adadecode_cuda (skipped where it is not built), or adadecode_emu (the emulated device: built everywhere)."""
    if name == "adadecode_emu":
        return pytest.importorskip(name, reason="adadecode_emu is not built (ADADECODE_BUILD_EMU=0)")
    return pytest.importorskip(
        name, reason="adadecode_cuda is not built here (pip install -e . with nvcc and a CUDA build of torch)")


MODULES = ["adadecode_cuda", "adadecode_emu"]

# op -> the argument list as pybind11 renders it (names in order; "=None"/"=False" marks a default).
FUSED = ["norm_weight=None", "eps=1e-05", "ring_first=-1", "pdl=False"]  # the fused decode kernels' input options
SIGNATURES = {
    "add_rmsnorm": ["residual", "delta", "weight", "out", "eps"],
    "embedding": ["tokens", "table", "out"],
    "skinny_gemm": ["x", "w", "out", "residual=None", "w_up=None", *FUSED],
    "gemm_tc": ["x", "w", "out", "residual=None", "w_up=None"],
    "linear": ["x", "w", "out", "residual=None", "w_up=None"],
    "rope_append_kv": ["qkv", "k_cache", "v_cache", "cos", "sin", "first_pos", "n_heads", "n_kv_heads"],
    "qkv_rope": ["x", "wqkv", "qkv_out", "k_cache", "v_cache", "cos", "sin", "first_pos", "n_heads", "n_kv_heads",
                 *FUSED],
    "attention_workspace_floats": ["R", "n_heads", "head_dim", "max_ctx"],
    "attention": ["q", "k_cache", "v_cache", "first_pos", "out", "n_heads", "max_ctx", "workspace=None",
                  "single_launch=True", "pdl=False"],
    "lm_head_workspace_floats": ["R", "n"],
    "lm_head_argmax": ["x", "w", "token", "max_prob", "lse=None", "vocab_subset=None", "w_rest=None",
                       "round_bf16=False", "workspace=None", *FUSED],
    "lm_head_sample_workspace_floats": ["R", "n"],
    "lm_head_sample": ["x", "w", "token", "max_prob", "seed", "pos", "inv_temperature", "top_k", "top_p", "lse=None",
                       "vocab_subset=None", "w_rest=None", "round_bf16=False", "workspace=None", *FUSED],
}


def _args(op) -> list[str]:
    first = op.__doc__.splitlines()[0]
    inner = first[first.index("(") + 1: first.rindex(")")]
    out = []
    for a in re.split(r",\s*(?![^\[]*\])", inner):  # split on commas outside Optional[...] brackets
        name = a.split(":")[0].strip()
        default = a.split("=")[1].strip() if "=" in a else None
        out.append(name if default is None else f"{name}={default}")
    return out


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_op_signature(module, name):
    op = getattr(ext(module), name, None)
    assert op is not None, f"{module} has no op {name}"
    assert _args(op) == SIGNATURES[name], f"{name}: {op.__doc__.splitlines()[0]}"


@pytest.mark.parametrize("module", MODULES)
def test_workspace_sizes(module):
    adadecode_cuda = ext(module)
    # attention: 4096 counters + R * H * ceil(max_ctx / 128) * (hd + 2) floats; lm head: ceil(n / 64) * R * 4 floats.
    assert adadecode_cuda.attention_counters == 4096
    assert adadecode_cuda.attention_workspace_floats(1, 32, 128, 4096) == 4096 + 32 * 32 * 130
    assert adadecode_cuda.attention_workspace_floats(3, 9, 64, 129) == 4096 + 3 * 9 * 2 * 66
    assert adadecode_cuda.lm_head_workspace_floats(16, 128256) == 2004 * 16 * 4
    assert adadecode_cuda.lm_head_workspace_floats(1, 65) == 2 * 4
    # sampling keeps the logits, the perturbed scores and the top-p weights too: 3 R n more floats
    assert adadecode_cuda.lm_head_sample_workspace_floats(16, 128256) == 2004 * 16 * 4 + 3 * 16 * 128256


def test_engines_have_the_same_methods():
    cuda, emu = ext("adadecode_cuda").Engine, ext("adadecode_emu").Engine
    public = lambda cls: sorted(n for n in dir(cls) if not n.startswith("_"))  # noqa: E731
    assert public(emu) == public(cuda)


def test_cpu_tensors_are_rejected_with_a_clear_error():
    adadecode_cuda = ext("adadecode_cuda")
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        adadecode_cuda.skinny_gemm(x, torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16))
