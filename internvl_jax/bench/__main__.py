"""Entry point of `python -m internvl_jax.bench` (see cli.py)."""

import os

# Before JAX starts: on a GPU, allocate on demand instead of grabbing 75% of the card, so that PyTorch, which
# runs in the same process, gets the memory too. No effect on CPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from internvl_jax.bench import cli  # noqa: E402  (after the environment is set)

if __name__ == "__main__":
  cli.main()
