"""Decoding methods on any engine of the contract (adadecode.engines): they call prefill, embed, run_layers, head,
final and truncate, and never look inside an engine.

    methods  the registry: each method's name, function, options and their checks, rows in flight (API, server, CLI)
    common   Generation, check_request, final_call, run_schedule, runs: what every method uses
    vanilla  generate_vanilla (greedy or seeded sampling)
    driver   generate_adadecode and generate_layerskip: exact early exits, verified by the final layer
    graphed  GraphedDecoder: the gpt-fast-style baseline (a static-shape step over a TorchEngine's state, one CUDA
             graph on a GPU); a decoding method of its own, so it lives here and not with the engines

The tests' and benchmarks' helpers (trace replay, the parity criterion) are adadecode.testing's.
"""
