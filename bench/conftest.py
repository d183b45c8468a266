"""pytest setup for ``pytest bench/``: the Triton interpreter must be on before htsat_kernels loads."""

from bench._env import prepare_process

prepare_process()
