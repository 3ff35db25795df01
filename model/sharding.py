"""Logical-axis rules, the ("data", "fsdp", "tensor") mesh, and sharded initialization.

Model code names logical axes only. A rules table maps each logical name onto mesh axes, in
priority order: a rule applies when its mesh axes are still free in that array and their size
divides the dimension (else the longest prefix that does), so a name may appear twice with a
fallback. Changing parallelism means changing the table, never the layers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_REPLICATED: Rules = (("length", None), ("layers", None))
_TENSOR: Rules = (("heads", "tensor"), ("kv", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))

RULES: dict[str, Rules] = {
    # Pure data parallelism: every device holds all parameters, the batch spans the mesh.
    "dp": (("batch", ("data", "fsdp", "tensor")), *_REPLICATED),
    # ZeRO-3 style: parameters split along "embed" over fsdp, gathered per layer by XLA.
    "fsdp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), *_REPLICATED),
    # FSDP plus Megatron-style tensor parallelism. "kv" (head dim) backs up "heads" when the
    # head count does not divide the tensor axis.
    "fsdp_tp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), *_TENSOR, *_REPLICATED),
    # Decoding: weights stay whole along "embed" so no step waits on an all-gather.
    "sample": (("batch", ("data", "fsdp")), *_TENSOR, *_REPLICATED),
}


def get_rules(rules: str | Rules) -> Rules:
    """A rules table by name in RULES, or `rules` itself when already a table."""
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(f"unknown sharding rules {rules!r}; choose one of {sorted(RULES)}")
        return RULES[rules]
    unknown = sorted({name for name, _ in rules} - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"rules name unknown logical axes {unknown}; known: {LOGICAL_AXES}")
    return tuple(rules)


def make_mesh(
    shape: Sequence[int] | Mapping[str, int], devices: Sequence[Any] | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one size may be -1, meaning all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
        sizes = [shape.get(axis, 1) for axis in MESH_AXES]
    else:
        sizes = list(shape)
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(shape)} needs one size per axis of {MESH_AXES}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes} must be positive, with at most one -1")
    if -1 in sizes:
        known = -math.prod(sizes)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into a mesh of sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))} cover {math.prod(sizes)} "
            f"devices but there are {len(devices)}; use -1 for the axis that takes the rest"
        )
    # Auto axes let GSPMD propagate shardings between the constraints the model sets.
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None,
    mesh_shape: Mapping[str, int],
    rules: str | Rules,
) -> PartitionSpec:
    """The mesh PartitionSpec for an array of `shape` (None: skip divisibility) with these names."""
    if shape is not None and len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    assigned: list[str | tuple[str, ...] | None] = [None] * len(logical_axes)
    used: set[str] = set()
    for name, mesh_axes in get_rules(rules):
        if mesh_axes is None or name not in logical_axes:
            continue
        dim = list(logical_axes).index(name)
        if assigned[dim] is not None:
            continue
        candidates = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        missing = [axis for axis in candidates if axis not in mesh_shape]
        if missing:
            raise ValueError(f"rule {name!r} -> {mesh_axes!r} names axes {missing} not in mesh")
        for k in range(len(candidates), 0, -1):
            prefix = candidates[:k]
            size = math.prod(mesh_shape[axis] for axis in prefix)
            if used.isdisjoint(prefix) and (shape is None or shape[dim] % size == 0):
                assigned[dim] = prefix[0] if k == 1 else prefix
                used.update(prefix)
                break
    return PartitionSpec(*assigned)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def unbox(tree: Any) -> Any:
    """`tree` with every nn.Partitioned box replaced by the plain value inside it."""
    return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def logical_specs(tree: Any) -> Any:
    """A parallel tree of PartitionSpecs of logical names (unboxed leaves get all-None specs)."""

    def spec(x: Any) -> PartitionSpec:
        if _is_box(x):
            return PartitionSpec(*x.names)
        return PartitionSpec(*([None] * len(x.shape)))

    return jax.tree.map(spec, tree, is_leaf=_is_box)


def specs_to_sharding(specs: Any, shapes: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """NamedShardings from a tree of logical PartitionSpecs and a parallel tree of arrays/shapes."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(
            mesh, logical_to_spec(tuple(spec), x.shape, mesh.shape, rules)
        ),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def logical_to_sharding(abstract_tree: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """NamedShardings for a (possibly nn.Partitioned-boxed) tree; the result is unboxed."""
    return specs_to_sharding(logical_specs(abstract_tree), unbox(abstract_tree), mesh, rules)


def init_sharded(
    init_fn: Callable[..., Any], *args: Any, mesh: Mesh, rules: str | Rules
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` straight into its shardings; returns (plain arrays, logical specs).

    `args` are traced (e.g. an rng key); bind static ones like a config with functools.partial.
    """
    # Shapes first, then shardings, so no device ever holds the whole tree.
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_sharding(abstract, mesh, rules)
    values = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return values, logical_specs(abstract)


def batch_sharding(
    mesh: Mesh, rules: str | Rules, shape: Sequence[int] | None = None
) -> NamedSharding:
    """The sharding of a [B, L] input (pass `shape` to fall back when B does not divide)."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), shape, mesh.shape, rules))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | Rules) -> Iterator[None]:
    """Activates `mesh` and `rules`; model activation constraints apply in jits traced inside."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules(rules)):
        yield


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains activation `x` by logical axis names; a no-op outside `use_rules`."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(
        x, logical_to_spec(logical_axes, x.shape, mesh.shape, rules)
    )
