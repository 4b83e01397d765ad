"""What only the tests and the benchmarks use, in one seam that says so: nothing in the product imports this package.

    parity  the rounding-tie criterion for comparing the tokens of two engines that round differently
    trace   record a run's engine calls and replay the schedule on another engine (bench/latency.py's trace replay)
    probes  the CPU kernels' probes (adadecode_cpu.testing: the read bandwidth, the vector exps, one lane dot product)

It lives in the package, not in tests/ or bench/, because both use it (and a lent GPU runs both from a checkout):
the parity criterion judges the GPU tests and bench/engine_parity.py, trace replay serves bench/latency.py and its
tests. tests/check_layers.py gives it its own part above the engines and decoding, which no other part may import.
"""
