"""internvl_jax: the InternVL vision-language family in JAX / Flax NNX."""

from flax import nnx as _nnx

# Parameters carry logical axis names as metadata only; placement onto a mesh happens in one place
# (internvl_jax.sharding) after abstract initialisation, never while a Variable is being created.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
