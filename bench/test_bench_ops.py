"""The benchmark cases under pytest-benchmark: ``pytest bench/ --benchmark-json=out.json``.

The cases are the ones ``python -m bench`` runs with the arguments in the env var ``BENCH_ARGS``
(default: none on a CUDA machine, ``--quick`` without one), e.g.
``BENCH_ARGS="--ops attention --dtypes bf16 --providers reference,fused" pytest bench/``.
Each test prepares its case (first call, errors against the fp32 reference), then times the call
with ``benchmark.pedantic``; the timed function synchronises the device before it returns, and the
untimed setup (clearing gradients, or the forward before a backward-only call) runs outside the
timing. The record's identity, byte formula and errors go to ``benchmark.extra_info``. A case that
cannot run here is skipped with its reason. Interpreter cases (numerics only) are not timed.
"""

from __future__ import annotations

import os
import shlex

from bench._env import prepare_process

prepare_process()  # before htsat_kernels is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from bench.cli import build_parser, plan  # noqa: E402
from bench.context import RunContext  # noqa: E402
from bench.harness import Skip, TimingConfig, synchronize  # noqa: E402

_DEFAULT_ARGS = "" if torch.cuda.is_available() else "--quick"
ARGS = build_parser().parse_args(shlex.split(os.environ.get("BENCH_ARGS", _DEFAULT_ARGS)))
DEVICE = torch.device(ARGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
CASES, _NOTES = plan(ARGS, DEVICE)
# Interpreter cases are numerics only: they record extra_info but time nothing.
pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
_CTX = None


def _ctx() -> RunContext:
    global _CTX
    if _CTX is None:
        if DEVICE.type == "cpu":
            torch.set_num_threads(ARGS.threads or 1)  # as python -m bench does on CPU
        elif ARGS.threads:
            torch.set_num_threads(ARGS.threads)
        _CTX = RunContext(device=DEVICE, quick=ARGS.quick, timing=TimingConfig(), model_compile_on_cpu=ARGS.model_compile_on_cpu)
    return _CTX


def _jsonable(v):
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


@pytest.mark.parametrize("case", CASES, ids=[f"{c.section}-{c.test_id()}" for c in CASES])
def test_bench(case, benchmark):
    ctx = _ctx()
    reason = case.plan_skip(ctx)
    if reason:
        pytest.skip(reason)
    try:
        prep = case.prepare(ctx)
    except Skip as exc:
        pytest.skip(str(exc))
    info = {**case.fields(), **{k: v for k, v in prep.fields.items()}}
    info["device"] = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    info["quick"] = ARGS.quick
    info["timed"] = prep.timed
    if prep.items_per_call:
        info["clips_per_call"] = prep.items_per_call  # clips/s = clips_per_call / stats.median
    benchmark.extra_info.update({k: _jsonable(v) for k, v in info.items()})
    if not prep.timed:
        return  # interpreter numerics: the errors are the result
    fn, device = prep.fn, DEVICE

    def timed():
        fn()
        synchronize(device)

    def setup():
        if prep.setup is not None:
            prep.setup()
        synchronize(device)

    rounds = 20 if DEVICE.type == "cuda" else 3
    benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
