"""Engines: one contract (DESIGN.md §3), several engines behind it; above the model, below every decoding method.

    contract  EngineContract: the host side every engine shares (rows in flight, depths, cache lengths, the checks)
    torch     TorchEngine: the oracle, a textbook Llama forward in PyTorch (CPU or GPU)
    cuda      CudaEngine: the product, the CUDA kernels of adadecode_cuda (or adadecode_emu: device="emu")
    head      Head: what an engine's head() computes (the head's math; head files are adadecode.heads')
    sampling  the seeded sampling rule that final() and head() draw by, in its reference form
    select    make_engine: "auto", "torch", "cuda", "emu"

Every engine gives the same tokens for the same calls (batch invariance, DESIGN.md §4); decoding methods and the
faces reach an engine through make_engine or the contract's calls only.
"""
