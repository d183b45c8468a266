"""bench: the benchmark and verification report of htsat-kernels.

- ``python -m bench [--quick] [--out DIR] [--ops ...] [--providers ...] [--dtypes ...]``: per-op
  and whole-model speed, peak memory and numerical error, printed as tables and written as JSON,
  CSV and PNG plots (``bench/results/README.md`` describes the files).
- ``python -m bench --static``: the compile report (registers, spills, shared memory, occupancy and
  tensor-core use of every Triton and CUDA kernel for sm_80/sm_90; no GPU needed).
- ``python -m bench.compare A.json B.json``: two runs side by side.
- ``python3 -m bench.gpu_check --budget 540`` (``make gpu-check``): all GPU evidence in one budgeted run.
- ``pytest bench/ --benchmark-json=out.json``: the same cases under pytest-benchmark.

Importing this package is cheap (no torch): the compare tool needs nothing else.
"""
