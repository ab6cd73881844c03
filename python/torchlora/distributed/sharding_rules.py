"""Sharding rules that let the ``torch.ops.torchlora`` operators take DTensor arguments.

Each rule lists, for one mesh dimension, the placements under which an operator can run on
the local shards and still compute the global result (DTensor expands them to every mesh
dimension and redistributes the inputs to the cheapest one). Three layouts are offered:

- colwise (the base layer's output features sharded): ``x`` replicated, ``lora_A``
  replicated, ``lora_B`` / ``lora_bias`` / ``base_out`` sharded on the output features; the
  output is sharded like ``base_out`` and the gradients of ``x`` and ``lora_A`` are partial
  sums (reduced where they meet a replicated tensor);
- rowwise (the input features sharded): ``x`` sharded on its last dimension, ``lora_A`` on
  its input dimension, ``lora_B`` replicated; the output is a partial sum, so ``base_out``,
  the base bias and ``lora_bias`` enter as partial values (a replicated bias is divided
  among the ranks: it is added once after the reduction);
- everything replicated.

Dropout: the mask of element ``i`` is drawn from (seed, ``i``) with ``i`` the index in the
tensor the kernel sees, so a mask is the single-process mask only when the kernel sees the
whole ``x``. With ``dropout_p > 0`` the rowwise layout is therefore not offered: ``x`` (and
``lora_A``) are gathered first, and the masks equal those of one process.

In-place operators (``lora_linear_``) cannot take DTensors: DTensor gives an in-place
operator's first argument back as its result, while ``_lora_linear_forward_`` returns the
``[T, r]`` shrink. They raise instead; the LoRA layers use ``lora_linear`` with DTensors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from .. import _native  # noqa: F401  (registers the operators)

__all__ = ["register_sharding_rules", "dtensor_available"]

_lock = threading.Lock()
_registered = False


def dtensor_available() -> bool:
    """Whether this torch build has ``torch.distributed.tensor`` (CPU-only builds may lack it)."""
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor  # noqa: F401
        from torch.distributed.tensor.experimental import register_sharding  # noqa: F401
    except ImportError:
        return False
    return True


def register_sharding_rules() -> bool:
    """Register the rules of the torchlora operators with DTensor, once per process.

    Returns False (and registers nothing) when this torch has no ``torch.distributed.tensor``.
    """
    global _registered
    if _registered:
        return True
    if not dtensor_available():
        return False
    with _lock:
        if not _registered:
            try:
                _register_all()
            except (AttributeError, ImportError, TypeError) as error:  # DTensor's internals moved
                raise RuntimeError(f"torchlora could not register its DTensor sharding rules with torch "
                                   f"{torch.__version__}: {error}") from error
            _registered = True
    return True


# ---- placements -----------------------------------------------------------------------------------

def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard
    return Replicate(), Partial(), Shard


def _last(spec: Any) -> Any:
    """``Shard`` of the last dimension of the tensor described by ``spec``."""
    _, _, Shard = _placements()
    return Shard(spec.ndim - 1)


def _if(present: Any, placement: Any) -> Any:
    """The placement of an optional tensor argument: None when the argument is absent."""
    return placement if present is not None else None


def _wanted(flag: bool, placement: Any) -> Any:
    """A gradient that was not asked for is an empty ``[0]`` tensor: replicated."""
    R, _, _ = _placements()
    return placement if flag else R


# ---- rules (one list entry per output, then one per argument; None for non-tensors) ---------------

def _lora_linear_layouts(x, base_out, lora_A, lora_B, lora_bias, dropout_p, seed):
    """(output, x, base_out, lora_A, lora_B, lora_bias) placements of the three layouts."""
    R, P, Shard = _placements()
    layouts = [
        (_last(base_out), R, _last(base_out), R, Shard(0), _if(lora_bias, Shard(0))),
        (R, R, R, R, R, _if(lora_bias, R)),
    ]
    if dropout_p == 0.0:
        layouts.append((P, _last(x), P, Shard(1), R, _if(lora_bias, P)))
    return layouts


def lora_linear_rule(x, base_out, lora_A, lora_B, lora_bias=None, scaling=1.0, dropout_p=0.0, seed=None):
    R, _, _ = _placements()
    return [([out], [px, pb, pa, pB, pbias, None, None, _if(seed, R)])
            for out, px, pb, pa, pB, pbias in _lora_linear_layouts(x, base_out, lora_A, lora_B, lora_bias,
                                                                   dropout_p, seed)]


def lora_linear_forward_rule(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed):
    R, P, _ = _placements()
    rules = []
    for out, px, pb, pa, pB, pbias in _lora_linear_layouts(x, base_out, lora_A, lora_B, lora_bias, dropout_p, seed):
        shrunk = P if out == P else R  # [T, r]: a partial sum when x and lora_A are sharded on `in`
        rules.append(([out, shrunk], [px, pb, pa, pB, pbias, None, None, _if(seed, R)]))
    return rules


def lora_linear_backward_rule(grad_out, x, shrunk, lora_A, lora_B, needs_lora_bias_grad, scaling, dropout_p, seed,
                              output_mask):
    R, P, Shard = _placements()
    gx, gA, gB = output_mask
    seed_p = _if(seed, R)
    rules = [
        # colwise: the shrink is whole; dx and dA sum over the sharded output features
        ([_wanted(gx, P), _wanted(gA, P), _wanted(gB, Shard(0)), _wanted(needs_lora_bias_grad, Shard(0))],
         [_last(grad_out), R, R, R, Shard(0), None, None, None, seed_p, None]),
        ([_wanted(gx, R), _wanted(gA, R), _wanted(gB, R), _wanted(needs_lora_bias_grad, R)],
         [R, R, R, R, R, None, None, None, seed_p, None]),
    ]
    if dropout_p == 0.0:
        # rowwise: the gradient of a partial output is whole; the shrink is reduced before dB
        rules.append(([_wanted(gx, _last(x)), _wanted(gA, Shard(1)), _wanted(gB, R), _wanted(needs_lora_bias_grad, R)],
                      [R, _last(x), R, Shard(1), R, None, None, None, seed_p, None]))
    return rules


def _linear_with_lora_layouts(x, weight, bias, lora_A, lora_B, lora_bias, dropout_p):
    """(output, x, weight, bias, lora_A, lora_B, lora_bias) placements of the three layouts."""
    R, P, Shard = _placements()
    layouts = [
        (_last(x), R, Shard(0), _if(bias, Shard(0)), R, Shard(0), _if(lora_bias, Shard(0))),
        (R, R, R, _if(bias, R), R, R, _if(lora_bias, R)),
    ]
    if dropout_p == 0.0:
        layouts.append((P, _last(x), Shard(1), _if(bias, P), Shard(1), R, _if(lora_bias, P)))
    return layouts


def linear_with_lora_rule(x, weight, bias, lora_A, lora_B, lora_bias=None, scaling=1.0, dropout_p=0.0, seed=None):
    R, _, _ = _placements()
    return [([out], [px, pw, pb, pa, pB, plb, None, None, _if(seed, R)])
            for out, px, pw, pb, pa, pB, plb in _linear_with_lora_layouts(x, weight, bias, lora_A, lora_B, lora_bias,
                                                                          dropout_p)]


def linear_with_lora_forward_rule(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed, keep_shrunk):
    R, P, _ = _placements()
    rules = []
    for out, px, pw, pb, pa, pB, plb in _linear_with_lora_layouts(x, weight, bias, lora_A, lora_B, lora_bias,
                                                                  dropout_p):
        shrunk = P if (out == P and keep_shrunk) else R
        # the packed dropout bits cover the whole x: only layouts with a replicated x draw them
        rules.append(([out, shrunk, R], [px, pw, pb, pa, pB, plb, None, None, _if(seed, R), None]))
    return rules


def linear_with_lora_backward_rule(grad_out, x, weight, shrunk, dropped_bits, lora_A, lora_B, needs_bias_grad,
                                   needs_lora_bias_grad, scaling, dropout_p, seed, output_mask):
    R, P, Shard = _placements()
    gx, gw, gA, gB = output_mask
    tail = [None, None, None, None, _if(seed, R), None]
    rules = [
        ([_wanted(gx, P), _wanted(gw, Shard(0)), _wanted(gA, P), _wanted(gB, Shard(0)),
          _wanted(needs_bias_grad, Shard(0)), _wanted(needs_lora_bias_grad, Shard(0))],
         [_last(grad_out), R, Shard(0), R, R, R, Shard(0), *tail]),
        ([_wanted(gx, R), _wanted(gw, R), _wanted(gA, R), _wanted(gB, R), _wanted(needs_bias_grad, R),
          _wanted(needs_lora_bias_grad, R)],
         [R, R, R, R, R, R, R, *tail]),
    ]
    if dropout_p == 0.0:
        rules.append(([_wanted(gx, _last(x)), _wanted(gw, Shard(1)), _wanted(gA, Shard(1)), _wanted(gB, R),
                       _wanted(needs_bias_grad, R), _wanted(needs_lora_bias_grad, R)],
                      [R, _last(x), Shard(1), R, R, Shard(1), R, *tail]))
    return rules


def dropout_apply_rule(x, p, seed):
    # The mask follows the element index of the whole tensor: x must not be sharded. A partial
    # sum is masked elementwise like its total.
    R, P, _ = _placements()
    return [([R], [R, None, R]), ([P], [P, None, R])]


def lora_embedding_rule(ids, base_out, lora_A, lora_B, scaling, padding_idx=-1, scale_grad_by_freq=False):
    R, _, Shard = _placements()
    # embedding_dim sharded (the base table's Shard(1)); a vocabulary-sharded lora_A is gathered
    return [([_last(base_out)], [R, _last(base_out), R, Shard(0), None, None, None]),
            ([R], [R, R, R, R, None, None, None])]


def lora_embedding_forward_rule(ids, base_out, lora_A, lora_B, scaling):
    R, _, Shard = _placements()
    return [([_last(base_out), R], [R, _last(base_out), R, Shard(0), None]),
            ([R, R], [R, R, R, R, None])]


def lora_embedding_backward_rule(grad_out, ids, gathered, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq,
                                 output_mask):
    R, P, Shard = _placements()
    gA, gB = output_mask
    return [([_wanted(gA, P), _wanted(gB, Shard(0))], [_last(grad_out), R, R, R, Shard(0), None, None, None, None]),
            ([_wanted(gA, R), _wanted(gB, R)], [R, R, R, R, R, None, None, None, None])]


def _rules() -> list[tuple[str, Callable[..., Sequence]]]:
    return [
        ("lora_linear", lora_linear_rule),
        ("_lora_linear_forward", lora_linear_forward_rule),
        ("_lora_linear_backward", lora_linear_backward_rule),
        ("linear_with_lora", linear_with_lora_rule),
        ("_linear_with_lora_forward", linear_with_lora_forward_rule),
        ("_linear_with_lora_backward", linear_with_lora_backward_rule),
        ("dropout_apply", dropout_apply_rule),
        ("lora_embedding", lora_embedding_rule),
        ("_lora_embedding_forward", lora_embedding_forward_rule),
        ("_lora_embedding_backward", lora_embedding_backward_rule),
    ]


_IN_PLACE_OPS = ("lora_linear_", "_lora_linear_forward_")


def _first_scalar_argument(op: torch._ops.OpOverload) -> int:
    """Index of the op's first non-tensor argument: it and everything after it (scaling,
    dropout_p, output_mask, ...) decide the rule, so they must be part of DTensor's cache key."""
    for index, argument in enumerate(op._schema.arguments):
        kind = argument.type
        if isinstance(kind, torch.OptionalType):
            kind = kind.getElementType()
        if not isinstance(kind, torch.TensorType):
            return index
    return len(op._schema.arguments)


def _register_all() -> None:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    propagator = DTensor._op_dispatcher.sharding_propagator
    for name, rule in _rules():
        op = getattr(torch.ops.torchlora, name).default
        register_sharding(op)(rule)
        # register_sharding keys its cache on the arguments from the first int only; these rules
        # also read floats and bools (dropout_p, output_mask), so every scalar is keyed.
        propagator.op_to_schema_info[op] = RuntimeSchemaInfo(static_argnum=_first_scalar_argument(op),
                                                             needs_pytree=True)
    for name in _IN_PLACE_OPS:
        op = getattr(torch.ops.torchlora, name).default
        propagator.register_op_strategy(op, _reject_in_place(name))


def _reject_in_place(name: str) -> Callable[[Any], Optional[Any]]:
    def strategy(op_schema: Any) -> None:
        raise NotImplementedError(
            f"torchlora.{name} does not take DTensor arguments (an in-place DTensor operator must return its "
            "first argument); use torchlora.ops.lora_linear, which returns a new tensor")
    return strategy
