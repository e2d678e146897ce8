"""Models of other frameworks as params to prune plus a function that rebuilds the model.

Linen needs nothing: its ``variables["params"]`` is the tree to prune. Flax
NNX and Equinox models are split into that tree and the rest with
:func:`split_nnx` and :func:`split_equinox`.
"""

from sfpk_jax.interop.split import SplitModel, split_equinox, split_nnx

__all__ = ["SplitModel", "split_equinox", "split_nnx"]
