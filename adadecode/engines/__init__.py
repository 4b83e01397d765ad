"""Engines: one contract (docs/design.md#contract), several engines behind it; above the model, below every decoding
method.

    contract  EngineContract: the host side every engine shares (rows in flight, depths, cache lengths, the checks)
    torch     TorchEngine: the oracle, a textbook Llama forward in PyTorch (CPU or GPU)
    native    NativeEngine: what the two native engines share (the forwarding to their binding, heads, test copies)
    cpu       CpuEngine: the product on a CPU, the native kernels of adadecode_cpu
    cuda      CudaEngine: the product on a GPU, the CUDA kernels of adadecode_cuda (or adadecode_emu: device="emu")
    options   EngineOptions: every engine option, read from the environment and checked in one place
    head      Head: what an engine's head() computes (the head's math; head files are adadecode.heads')
    sampling  the seeded sampling rule that final() and head() draw by, in its reference form
    select    make_engine: "auto", "torch", "cpu", "cuda", "emu"

Every engine gives the same tokens for the same calls (batch invariance, docs/design.md#invariance); decoding
methods and the faces reach an engine through make_engine or the contract's calls only.
"""
