"""``python -m bench``: see ``bench/cli.py`` and ``bench/results/README.md``."""

from bench._env import prepare_process

# Before anything imports htsat_kernels: without CUDA the Triton kernels need the interpreter.
prepare_process()

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
