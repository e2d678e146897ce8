"""The model's layers, read off its loss's jaxpr: what each weight is, and which produce the outputs.

Channel masks must know, for every weight they mask, its output- and
input-channel axes, and which layer produces the model's outputs (its output
channels are the classes) or reads its inputs (its input channels are the
image's). The parameter tree alone cannot tell a convolution kernel
``(h, w, in, out)`` from a ``DenseGeneral`` kernel ``(in, heads, dim)``, nor
the classifier from a hidden layer. The loss can: :func:`trace_layers`
traces ``loss_fn(params, batch)`` to a jaxpr (nothing is computed) and
follows every parameter to the ``dot_general`` or ``conv_general_dilated``
that uses it as a kernel, reading the kernel's axes from the operation's
dimension numbers. This works alike for Flax Linen, Flax NNX and Equinox
(whose vmapped layers trace to the same operations).

* A *layer* is a ``dot_general`` or ``conv_general_dilated`` with one
  operand a parameter (through transposes, casts and elementwise scaling,
  e.g. by a mask) and the other computed from the batch.
* Its *output layers* are those whose result reaches the loss through no
  other layer (the classifier); its *input layers* are those that read the
  batch through no other layer (the first convolution).
* A weight used as anything else (an embedding table read by ``gather``, an
  attention kernel with several output axes, the stacked kernels of layers
  run by a ``scan``) has no known channel axes.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from jax.extend import core as jcore

from sfpk_jax.core.mask_checks import check_params, path_to_str

# Operations whose result is a permutation or an elementwise transform of one
# operand, so that a parameter's axes can be followed through them.
_SAME_AXES = {"convert_element_type", "copy", "mul", "div", "neg", "add", "sub", "copy_p",
              "reduce_precision", "optimization_barrier"}


class LayerUse(NamedTuple):
    """How a weight is used as the kernel of a layer.

    Attributes:
      op: ``"dense"`` (``dot_general``) or ``"conv"`` (``conv_general_dilated``).
      out_axis: the kernel's output-channel axis, or None when it has several
        (a ``DenseGeneral`` kernel with more than one output axis) or its axes
        were lost on the way (a reshape).
      in_axis: the kernel's input-channel axis, or None likewise.
    """

    op: str
    out_axis: int | None
    in_axis: int | None

    @property
    def known(self) -> bool:
        """Both channel axes are known: channel masks can be applied."""
        return self.out_axis is not None and self.in_axis is not None


@dataclasses.dataclass(frozen=True)
class Layers:
    """What :func:`trace_layers` read off a loss: each kernel's use and the model's ends.

    Attributes:
      uses: kernel path -> its :class:`LayerUse`.
      outputs: the paths of the kernels whose layers produce the outputs.
      inputs: the paths of the kernels whose layers read the inputs.
      where: a restriction of the prunable kernels by the user (``prunable=``
        a regex or callable), set with :meth:`restrict`; None: the default
        rule, which keeps the classes (``mask_dim="out"``) and the inputs'
        channels (``mask_dim="in"``).
    """

    uses: Mapping[str, LayerUse]
    outputs: frozenset[str]
    inputs: frozenset[str]
    where: Any = None

    def __hash__(self) -> int:  # layouts hold one; layouts are cache keys
        return hash((tuple(sorted(self.uses.items())), self.outputs, self.inputs,
                     self.where if isinstance(self.where, str) else id(self.where)))

    def restrict(self, where: str | Callable[[str, Any], bool]) -> "Layers":
        """These layers, prunable only where ``where`` (a regex over paths, or a callable
        ``(path, leaf) -> bool``) selects; the classes and inputs are then not kept by default."""
        return dataclasses.replace(self, where=where)

    def selects(self, path: str, leaf: Any) -> bool:
        """Whether the user's restriction (if any) selects ``path``."""
        if self.where is None:
            return True
        if isinstance(self.where, str):
            return bool(re.search(self.where, path))
        return bool(self.where(path, leaf))


class _Var(NamedTuple):
    """What is known of one value of the jaxpr."""

    param: tuple[int, tuple[int, ...] | None] | None = None  # (leaf, axes as leaf axes) of a view
    pure: bool = True  # computed from parameters and constants alone
    from_input: bool = False  # reads the batch through no layer
    last: frozenset[int] = frozenset()  # the layers most recently passed on some path


_CONST = _Var()


def _merge(values: list[_Var]) -> _Var:
    return _Var(pure=all(v.pure for v in values), from_input=any(v.from_input for v in values),
                last=frozenset().union(*(v.last for v in values)))


class _Reader:
    """Walks a jaxpr once, recording layer uses (by parameter leaf index)."""

    def __init__(self):
        self.uses: dict[int, set[LayerUse]] = {}
        self.inputs: set[int] = set()

    def read(self, jaxpr, values: list[_Var]) -> list[_Var]:
        env = {}
        for var, value in zip(jaxpr.invars, values):
            env[var] = value
        get = lambda v: _CONST if isinstance(v, jcore.Literal) else env.get(v, _CONST)
        for eqn in jaxpr.eqns:
            ins = [get(v) for v in eqn.invars]
            outs = self._eqn(eqn, ins)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [get(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, ins: list[_Var]) -> list[_Var]:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            layer = self._layer(eqn, ins)
            if layer is not None:
                return [layer]
        inner = _call_jaxpr(eqn)
        if inner is not None:
            # A parameter the call slices (a scan over stacked layers' kernels) enters with
            # fewer axes than the leaf has: its channel axes are not known.
            ins = [v._replace(param=(v.param[0], None))
                   if v.param is not None and len(outer.aval.shape) != len(var.aval.shape)
                   else v for v, outer, var in zip(ins, eqn.invars, inner.invars)]
            return self.read(inner, ins)
        merged = _merge(ins)
        views = [v for v in ins if v.param is not None]
        others_constant = all(v.param is None and v.pure and not v.last for v in ins
                              if v.param is None)
        if len(views) == 1 and others_constant and len(eqn.outvars) == 1:
            leaf, axes = views[0].param
            out_rank = len(eqn.outvars[0].aval.shape)
            if name == "transpose" and axes is not None:
                axes = tuple(axes[p] for p in eqn.params["permutation"])
            elif name not in _SAME_AXES or axes is None or len(axes) != out_rank:
                axes = None
            return [merged._replace(param=(leaf, axes))]
        return [merged] * len(eqn.outvars)

    def _layer(self, eqn, ins: list[_Var]) -> _Var | None:
        """The output of a layer op, recording the kernel's use; None if it is no layer."""
        kernels = [i for i, v in enumerate(ins[:2]) if v.param is not None]
        # One operand a parameter, the other computed from the batch.
        if len(kernels) != 1 or ins[1 - kernels[0]].pure:
            return None
        k = kernels[0]
        leaf, axes = ins[k].param
        activation = ins[1 - k]
        out_axis = in_axis = None
        if eqn.primitive.name == "dot_general":
            (contract, batch) = eqn.params["dimension_numbers"]
            own_contract, own_batch = contract[k], batch[k]
            free = [a for a in range(len(eqn.invars[k].aval.shape))
                    if a not in own_contract and a not in own_batch]
            if len(own_contract) == 1 and len(free) == 1 and not own_batch:
                in_axis, out_axis = own_contract[0], free[0]
            op = "dense"
        else:
            spec = eqn.params["dimension_numbers"]
            if k == 1:  # the kernel is the rhs, as every framework writes a convolution
                out_axis, in_axis = spec.rhs_spec[0], spec.rhs_spec[1]
            op = "conv"
        if axes is None:
            out_axis = in_axis = None
        else:
            out_axis = None if out_axis is None else axes[out_axis]
            in_axis = None if in_axis is None else axes[in_axis]
        self.uses.setdefault(leaf, set()).add(LayerUse(op, out_axis, in_axis))
        if activation.from_input:
            self.inputs.add(leaf)
        return _Var(pure=False, last=frozenset({leaf}))


def _call_jaxpr(eqn):
    """The inner jaxpr of a call-like operation (jit, custom_jvp/vjp, remat, scan) whose
    inputs and outputs are the operation's own, one to one; None for others (cond, while)."""
    inner = [p for p in eqn.params.values() if isinstance(p, (jcore.ClosedJaxpr, jcore.Jaxpr))]
    if len(inner) != 1:
        return None
    jaxpr = inner[0].jaxpr if isinstance(inner[0], jcore.ClosedJaxpr) else inner[0]
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return jaxpr


def trace_layers(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any) -> Layers:
    """Reads the model's layers off the jaxpr of ``loss_fn(params, batch)``.

    Nothing is computed: the loss is traced once (with the shapes of
    ``params`` and ``batch``; abstract ``jax.ShapeDtypeStruct`` leaves do).

    Example:

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from sfpk_jax.core.layers import trace_layers
    >>> model = nn.Sequential([nn.Conv(8, (3, 3)), nn.relu, lambda x: x.mean((1, 2)), nn.Dense(10)])
    >>> x = jnp.ones((2, 8, 8, 1))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> layers = trace_layers(lambda p, b: model.apply({"params": p}, b).sum(), params, x)
    >>> layers.uses["layers_0/kernel"], sorted(layers.outputs), sorted(layers.inputs)
    (LayerUse(op='conv', out_axis=3, in_axis=2), ['layers_3/kernel'], ['layers_0/kernel'])

    Args:
      loss_fn: the loss the model is pruned by: ``loss_fn(params, batch)``.
      params: the parameter pytree (arrays or ``ShapeDtypeStruct``).
      batch: one batch of the loss (one particle's, without the particle axis).

    Returns:
      The :class:`Layers`: every kernel's use and axes, the output layers and
      the input layers, by parameter path.
    """
    check_params(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    closed = jax.make_jaxpr(lambda ps, b: loss_fn(jax.tree_util.tree_unflatten(treedef, ps), b))(
        leaves, batch)
    n_params = len(leaves)
    values = [_Var(param=(i, tuple(range(len(jax.numpy.shape(leaf)))))) for i, leaf in
              enumerate(leaves)]
    values += [_Var(pure=False, from_input=True)] * (len(closed.jaxpr.invars) - n_params)
    reader = _Reader()
    outs = reader.read(closed.jaxpr, values)
    uses = {}
    for leaf, found in reader.uses.items():
        # One use, or several that agree (a kernel applied chunk by chunk); else unknown.
        use = next(iter(found)) if len(found) == 1 else LayerUse(
            found.pop().op, None, None)
        uses[paths[leaf]] = use
    return Layers(uses=uses,
                  outputs=frozenset(paths[i] for i in (outs[0].last if outs else ())),
                  inputs=frozenset(paths[i] for i in reader.inputs))


def first_batch(batches: Any) -> tuple[Any, Any]:
    """The first batch of the pruners' ``batches``, and the batches as given.

    Args:
      batches: an iterable, or a function ``start -> iterable``, of batches.

    Returns:
      ``(first, batches)``: ``first`` is None when there is none; an
      iterator that was read from is handed back with its first batch put
      back in front.
    """
    if batches is None:
        return None, None
    if callable(batches):
        return next(iter(batches(0)), None), batches
    stream = iter(batches)
    first = next(stream, None)
    return first, (stream if first is None else itertools.chain([first], stream))


def layers_from_batches(loss_fn: Callable, params: Any, batches: Any) -> tuple[Layers, Any]:
    """The model's layers, traced with the first batch of ``batches``; and the batches as given.

    Args:
      loss_fn: ``loss_fn(params, batch)``.
      params: the parameter pytree.
      batches: the pruners' batches: an iterable, or a function ``start ->
        iterable``, of batches whose leaves have a leading particle axis (the
        first particle's slice is traced).

    Returns:
      ``(layers, batches)``, the batches as :func:`first_batch` hands them back.

    Raises:
      ValueError: there is no batch to trace the loss with.
    """
    if batches is None:
        raise ValueError("channel and N:M masks read the model's layers off its loss on one "
                         "batch: pass batches (one is read), or prunable=trace_layers(loss_fn, "
                         "params, batch)")
    first, batches = first_batch(batches)
    if first is None:
        raise ValueError("batches is empty: channel and N:M masks read the model's layers off "
                         "its loss on the first batch")
    return trace_layers(loss_fn, params, jax.tree.map(lambda x: x[0], first)), batches
