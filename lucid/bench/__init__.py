"""Every benchmark of Lucid in one room, with one statistics module (`lucid.bench.stats`).

    lucid.bench.methods          `lucid bench`: prefill / decode latency and memory of every method
    lucid.bench.sam              the SAM backends' latency (BENCHMARKS.md, SAM table)
    lucid.bench.kernels          the Triton kernel against the torch reference and SDPA
    lucid.bench.rest             the REST service's overhead and load (`python -m lucid.bench.rest`)
    lucid.bench.eval_throughput  eval jobs' samples/s with 1 and N workers

Speed and memory are measured here, never asserted in tests.
"""
