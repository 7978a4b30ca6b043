"""Meshes, logical axis names and rule sets (DESIGN section 5): one model, any mesh.

Every param gets logical axes from its path by the rules its model registers (`register_param_axes`; this
module knows no model); activations at block boundaries carry ("batch", "length", "embed") through a model's
`activation_sharding` hook (`activation_hook`). A rule set is data:
an ordered tuple of (logical name, mesh axes) pairs. For each dim of an array, the first rule for its
name whose mesh axes are unused in that array and whose size divides the dim wins; otherwise the dim
is replicated. So a new parallelism is a new rule set, e.g. `RULE_SETS["fsdp"] + (("length", "context"),)`.

Run sharded functions with `jax.jit(in_shardings=, out_shardings=)` under `jax.set_mesh(mesh)`;
`ShardedFunction(fn, mesh, rules, *AXES)` does both for any entry point, with the shardings picked from the
argument shapes by its `EntryAxes` (e.g. `FORWARD_AXES`); the entry point itself is built with the
activation constraints in its `RunOptions` (`on_mesh(options, mesh, rules)`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from customshift_jax.tree_paths import key_names

MESH_AXES = ("data", "fsdp", "tensor", "context")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "mlp", "lora", "layers")

MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]
RulesLike = Union[str, Rules, Sequence[tuple[str, MeshAxes]], Mapping[str, MeshAxes]]
AnyMesh = Union[Mesh, AbstractMesh]

_BATCH: Rules = (("batch", ("data", "fsdp")), ("batch", "data"), ("batch", "fsdp"))
RULE_SETS: dict[str, Rules] = {
    # Data parallel: params replicated, batch split.
    "dp": _BATCH,
    # Fully sharded: every weight dim may take "fsdp"; the first dim of a param that divides gets it.
    "fsdp": _BATCH + (("embed", "fsdp"), ("heads", "fsdp"), ("mlp", "fsdp")),
    # Tensor parallel (Megatron-style): attention heads and the MLP hidden dim split; params otherwise replicated.
    "tp": _BATCH + (("heads", "tensor"), ("mlp", "tensor")),
    # Both: embed over fsdp, heads and mlp over tensor. A heads / mlp dim takes (tensor, fsdp) where fsdp is still
    # free in that array (output projections, biases, lora_B): everything is split over both axes. This also
    # avoids a kernel laid out (tensor, fsdp), which jaxlib 0.10.2 miscompiles next to a batch split over
    # (data, fsdp); and the batch takes (fsdp, data), not (data, fsdp): with the latter the same jaxlib gives
    # wrong gradients for the text stream of the training step on data=2 x fsdp=2 x tensor=2 (the forward is
    # right either way). See docs/multihost.md, "Known compiler issue".
    "fsdp_tp": (("batch", ("fsdp", "data")),) + _BATCH[1:] + (
        ("embed", "fsdp"), ("heads", ("tensor", "fsdp")), ("heads", "tensor"), ("heads", "fsdp"),
        ("mlp", ("tensor", "fsdp")), ("mlp", "tensor"), ("mlp", "fsdp")),
}
# Sequence (context) parallel: activations split along tokens, on top of fsdp_tp.
RULE_SETS["context"] = RULE_SETS["fsdp_tp"] + (("length", "context"),)

# ------------------------------------------------------------------------------------ params' logical axes

# A model's rule for its params: (path keys, shape) -> logical axes, or None for a param it does not declare.
ParamAxes = Callable[[tuple[str, ...], tuple[int, ...]], Union[tuple[Union[str, None], ...], None]]
_PARAM_AXES: dict[str, ParamAxes] = {}


def register_param_axes(name: str, rule: ParamAxes) -> None:
    """Declare a package's params' logical axes (each model's `axes` module does, when imported). Rules
    registered later are tried first, so a package built on a model extends it (CustomShift's beta on the MMDiT)."""
    _PARAM_AXES.pop(name, None)
    _PARAM_AXES[name] = rule


def logical_axes(path: Sequence[str] | str, shape: Sequence[int], axes: ParamAxes | None = None
                 ) -> tuple[str | None, ...]:
    """A param's logical axes from its path ("/"-joined or keys) by `axes`, or else by the registered rules (the
    last registered that declares it); a param none declares is replicated (all None)."""
    path = tuple(path.split("/")) if isinstance(path, str) else tuple(str(p) for p in path)
    shape = tuple(shape)
    for rule in (axes,) if axes is not None else reversed(_PARAM_AXES.values()):
        found = rule(path, shape)
        if found is not None:
            return tuple(found)
    return (None,) * len(shape)



def as_rules(rules: RulesLike) -> Rules:
    """A rule set from its name, a sequence of (logical, mesh axes) pairs, or a mapping; validated."""
    if isinstance(rules, str):
        try:
            return RULE_SETS[rules]
        except KeyError:
            raise ValueError(f"unknown rule set {rules!r}; known: {', '.join(RULE_SETS)}.") from None
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError(f"a rule is a (logical name, mesh axes) pair; got {pair!r}.")
        name, axes = pair
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append((name, axes if len(axes) != 1 else axes[0]))
    return tuple(out)


def extend_rules(rules: RulesLike, *pairs: tuple[str, MeshAxes], first: bool = True) -> Rules:
    """`rules` plus more (logical, mesh axes) pairs, tried before (`first`) or after the existing ones."""
    extra = as_rules(list(pairs))
    base = as_rules(rules)
    return extra + base if first else base + extra


# ----------------------------------------------------------------------------------------------- meshes

MESH_HINT = ("On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N (set before starting) makes N "
             "devices.")


def mesh_shape(n_devices: int, data: int = 1, fsdp: int = 1, tensor: int = 1, context: int = 1) -> dict[str, int]:
    """Axis sizes for `n_devices`; one size may be -1 (fills the rest). Errors name the sizes and the count."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "context": context}
    fill = [k for k, v in sizes.items() if v == -1]
    bad = [f"{k}={v}" for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)]
    if bad or len(fill) > 1:
        raise ValueError(f"mesh sizes must be positive integers with at most one -1; got {sizes}.")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n_devices % known:
            raise ValueError(f"mesh sizes {sizes}: the fixed axes ({known} devices) do not divide the "
                             f"{n_devices} devices. {MESH_HINT}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh sizes {sizes} make {math.prod(sizes.values())} devices, but there are "
                         f"{n_devices} devices. Give one axis -1 to fill the rest. {MESH_HINT}")
    return sizes


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, context: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices (or `devices`) with axes ("data", "fsdp", "tensor", "context"), Auto axis types.

    On several TPU slices (devices with distinct `slice_index`) the "data" axis is outermost and crosses the
    slices over DCN (each slice holds data / slices of it); the other axes stay inside a slice, on ICI.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(len(devices), data, fsdp, tensor, context)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    from jax.experimental import mesh_utils

    if slices == 1:
        try:
            return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=axis_types, devices=devices)
        except NotImplementedError:  # e.g. tensor=2 on a TPU's 8x8 chips: split a physical axis between two
            grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices, allow_split_physical_axes=True)
            return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if sizes["data"] % slices:
        raise ValueError(f"mesh sizes {sizes}: on {slices} slices the data axis crosses them over DCN, so data "
                         f"must be a multiple of {slices} (e.g. data={slices},fsdp=-1).")
    ici = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"], sizes["context"])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1, 1), devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def parse_mesh(text: str) -> dict[str, int]:
    """Mesh sizes from "data=2,fsdp=4" (the CLI's --mesh): axis names from MESH_AXES, one size may be -1."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or name in sizes:
            raise ValueError(f"mesh {text!r}: {name!r} is not a mesh axis or repeats; axes are {', '.join(MESH_AXES)}.")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh {text!r}: {part!r} is not NAME=SIZE with an integer SIZE.") from None
    if not sizes:
        raise ValueError(f"mesh {text!r}: give NAME=SIZE pairs, e.g. data=2,fsdp=4.")
    return sizes


def abstract_mesh(n_devices: int, data: int = 1, fsdp: int = 1, tensor: int = 1, context: int = 1) -> AbstractMesh:
    """A device-free mesh of `n_devices` (for planning: 256 devices need not exist)."""
    sizes = mesh_shape(n_devices, data, fsdp, tensor, context)
    return AbstractMesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_sizes(mesh: AnyMesh | Mapping[str, int]) -> dict[str, int]:
    return dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)


# ------------------------------------------------------------------------------------- logical -> spec

@dataclasses.dataclass(frozen=True)
class Layout:
    """How one array is laid out: its logical axes, spec, per-device shape and why dims stay whole."""

    logical: tuple[str | None, ...]
    spec: PartitionSpec
    shard_shape: tuple[int, ...]
    notes: tuple[str, ...] = ()


def resolve(logical: Sequence[str | None], shape: Sequence[int], mesh: AnyMesh | Mapping[str, int],
            rules: RulesLike) -> Layout:
    """The spec of an array with these logical axes and shape on `mesh` under `rules` (see the module doc).

    Mesh axes of size 1 or absent from the mesh are dropped; a dim no rule divides is replicated (noted).
    """
    rules = as_rules(rules)
    sizes = _mesh_sizes(mesh)
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}.")
    used: set[str] = set()
    spec, shard, notes = [], [], []
    for name, dim in zip(logical, shape):
        chosen: tuple[str, ...] = ()
        tried = []
        for rule_name, axes in rules:
            if name is None or rule_name != name:
                continue
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
            if not axes:
                continue
            n = math.prod(sizes[a] for a in axes)
            if used.intersection(axes):
                continue
            if dim % n:
                tried.append(f"{name} {dim} % {'x'.join(axes)}={n}")
                continue
            chosen = axes
            break
        if not chosen and tried:
            notes.append(f"{'; '.join(tried)} != 0: replicated")
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
        shard.append(dim // math.prod(sizes[a] for a in chosen) if chosen else dim)
    while spec and spec[-1] is None:
        spec.pop()
    return Layout(tuple(logical), PartitionSpec(*spec), tuple(shard), tuple(notes))


def logical_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: AnyMesh,
                 rules: RulesLike) -> PartitionSpec:
    """The PartitionSpec only (see `resolve`)."""
    return resolve(logical, shape, mesh, rules).spec


def logical_sharding(logical: Sequence[str | None], shape: Sequence[int], mesh: AnyMesh,
                     rules: RulesLike) -> NamedSharding:
    """NamedSharding of an array with these logical axes on `mesh` under `rules`."""
    return NamedSharding(mesh, logical_spec(logical, shape, mesh, rules))


def param_layouts(tree: Any, mesh: AnyMesh | Mapping[str, int], rules: RulesLike, axes: ParamAxes | None = None
                  ) -> Any:
    """A `Layout` per leaf of a params or LoRA tree (arrays or ShapeDtypeStructs); `axes`: see `logical_axes`."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: resolve(logical_axes(key_names(p), np.shape(x), axes), np.shape(x), mesh, rules), tree)


def param_shardings(tree: Any, mesh: AnyMesh, rules: RulesLike, axes: ParamAxes | None = None) -> Any:
    """NamedSharding per leaf of a params or LoRA tree: the `in_shardings` entry for it; `axes`: see `logical_axes`."""
    return jax.tree_util.tree_map(lambda layout: NamedSharding(mesh, layout.spec),
                                  param_layouts(tree, mesh, rules, axes), is_leaf=lambda x: isinstance(x, Layout))


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place one array with `sharding`; works when the mesh spans several processes (same value on each)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)  # local placement, or a reshard of a global array
    host = np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(np.result_type(x)))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, mesh: Mesh, rules: RulesLike, axes: ParamAxes | None = None) -> Any:
    """The params (or LoRA) tree placed on `mesh` by `rules`; `axes`: see `logical_axes`."""
    return jax.tree_util.tree_map(put, params, param_shardings(params, mesh, rules, axes))


def abstract_params(tree: Any, mesh: Mesh, rules: RulesLike, axes: ParamAxes | None = None) -> Any:
    """ShapeDtypeStructs with shardings: the restore target of `distributed.restore_sharded`."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree,
                                  param_shardings(tree, mesh, rules, axes))


def activation_hook(mesh: Mesh, rules: RulesLike) -> Callable[[jax.Array, tuple[str | None, ...]], jax.Array]:
    """The MMDiT's `activation_sharding`: a sharding constraint by logical names at each block boundary."""
    rules = as_rules(rules)

    def hook(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, logical_sharding(logical, x.shape, mesh, rules))

    return hook


def on_mesh(options: Any, mesh: Mesh | None, rules: RulesLike) -> Any:
    """`options` (a `RunOptions`) with `activation_hook(mesh, rules)` as its block-boundary hook, unless it has
    one already; unchanged without a mesh. What an entry point wrapped by `ShardedFunction` is built with."""
    if mesh is None or options.activation_sharding is not None:
        return options
    return options.replace(activation_sharding=activation_hook(mesh, rules))


# --------------------------------------------------------------------------------------------- tables

def _itemsize(x: Any) -> int:
    return np.dtype(x.dtype).itemsize


def bytes_per_device(tree: Any, mesh: AnyMesh | Mapping[str, int], rules: RulesLike, *,
                     dtype: Any = None, axes: ParamAxes | None = None) -> int:
    """Bytes of a params / LoRA tree on one device under `rules` (`dtype` overrides the leaves' dtype)."""
    layouts = jax.tree_util.tree_leaves(param_layouts(tree, mesh, rules, axes),
                                        is_leaf=lambda x: isinstance(x, Layout))
    leaves = jax.tree_util.tree_leaves(tree)
    size = (lambda x: np.dtype(dtype).itemsize) if dtype is not None else _itemsize
    return sum(math.prod(l.shard_shape) * size(x) for l, x in zip(layouts, leaves))


def tree_bytes(tree: Any, *, dtype: Any = None) -> int:
    """Unsharded bytes of a tree."""
    return sum(int(np.prod(np.shape(x))) * (np.dtype(dtype or x.dtype).itemsize)
               for x in jax.tree_util.tree_leaves(tree))


def layout_table(tree: Any, mesh: AnyMesh | Mapping[str, int], rules: RulesLike, axes: ParamAxes | None = None
                 ) -> str:
    """A text table: each param's shape, logical axes, spec, per-device shape and bytes, and notes."""
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    total = total_full = 0
    for path, x in flat:
        keys = key_names(path)
        shape = tuple(np.shape(x))
        layout = resolve(logical_axes(keys, shape, axes), shape, mesh, rules)
        nbytes = math.prod(layout.shard_shape) * _itemsize(x)
        total += nbytes
        total_full += math.prod(shape) * _itemsize(x)
        logical = ",".join(a or "-" for a in layout.logical)
        spec = ",".join("-" if a is None else a if isinstance(a, str) else "+".join(a) for a in layout.spec) or "-"
        note = "; ".join(layout.notes) or ("replicated" if not any(layout.spec) else "")
        rows.append(("/".join(keys), str(shape), logical, spec, str(layout.shard_shape), f"{nbytes:,}", note))
    header = ("param", "shape", "logical", "spec", "per device", "bytes/dev", "note")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    sizes = _mesh_sizes(mesh)
    lines = [f"mesh {sizes}, {len(flat)} params", fmt(header), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in rows]
    lines.append(f"total: {total:,} bytes per device of {total_full:,} ({total / max(total_full, 1):.4f})")
    return "\n".join(lines)


def print_layout(tree: Any, mesh: AnyMesh | Mapping[str, int], rules: RulesLike, axes: ParamAxes | None = None
                 ) -> None:
    """Print `layout_table`."""
    print(layout_table(tree, mesh, rules, axes))


# ------------------------------------------------------------------------------ sharded entry points

def _leaf_shardings(tree: Any, logical: Callable[[tuple[int, ...]], tuple[str | None, ...]], mesh: Mesh,
                    rules: Rules) -> Any:
    return jax.tree_util.tree_map(lambda x: logical_sharding(logical(np.shape(x)), np.shape(x), mesh, rules), tree)


def _data_axes(*names: str | None) -> Callable[[tuple[int, ...]], tuple[str | None, ...]]:
    """Logical axes for the leading dims; the rest whole."""
    return lambda shape: tuple(names[:len(shape)]) + (None,) * max(0, len(shape) - len(names))


KV_AXES = ("layers", "batch", "length", "heads", None)  # RefCache K, V: (L, B, R+S, H, D)
LATENT_AXES = _data_axes("batch")  # (B, C, H, W)
TOKEN_AXES = _data_axes("batch", "length")  # (B, M, joint_dim)
KV_AXES_FN = _data_axes(*KV_AXES)  # the same, as a shape -> logical axes function
BATCH_AXES = _data_axes("batch")  # any batch-leading array, e.g. pooled (B, P) or timesteps (B,)
REPLICATED = _data_axes()  # scalars, schedules, masks: whole on every device

# What `tree_shardings` takes as the axes of one argument (or output):
#   "params"           a params / LoRA / train-state tree: each leaf's axes from its path (`logical_axes`);
#   shape -> logical   one function for every leaf (e.g. LATENT_AXES);
#   {key: axes}        a dict argument, per key ("*" for the other keys; absent: replicated);
#   (axes, ...)        a tuple / list argument (or output), per element.
ArgAxes = Any


def tree_shardings(tree: Any, axes: ArgAxes, mesh: Mesh, rules: RulesLike) -> Any:
    """NamedShardings for `tree` (arrays or ShapeDtypeStructs) from `axes` (see `ArgAxes`); None stays None."""
    rules = as_rules(rules)
    if tree is None:
        return None
    if isinstance(axes, str):
        if axes != "params":
            raise ValueError(f"argument axes must be 'params', a function, a dict or a tuple; got {axes!r}.")
        return param_shardings(tree, mesh, rules)
    if callable(axes):
        return _leaf_shardings(tree, axes, mesh, rules)
    if isinstance(axes, Mapping):
        if not isinstance(tree, Mapping):
            raise TypeError(f"per-key axes {sorted(axes)} need a dict argument, got {type(tree).__name__}.")
        return {k: tree_shardings(v, axes.get(k, axes.get("*", REPLICATED)), mesh, rules) for k, v in tree.items()}
    if not isinstance(tree, (tuple, list)) or len(tree) != len(axes):
        raise TypeError(f"{len(axes)} per-element axes need a tuple of that length, got {type(tree).__name__}.")
    return type(tree)(tree_shardings(t, a, mesh, rules) for t, a in zip(tree, axes))


class EntryAxes(NamedTuple):
    """The logical axes of an entry point's arguments (one `ArgAxes` each, in order) and of its output: its
    sharded form is `ShardedFunction(fn, mesh, rules, *axes)`."""

    args: tuple
    out: ArgAxes


# The MMDiT forward f(params, hidden_states, timestep, encoder_hidden_states, pooled, skip_mask) -> sample.
FORWARD_AXES = EntryAxes(("params", LATENT_AXES, BATCH_AXES, TOKEN_AXES, BATCH_AXES, REPLICATED), LATENT_AXES)


def _dtype(x: Any) -> Any:
    return jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype") else jnp.result_type(x))


class ShardedFunction:
    """`fn` jitted with in/out shardings from logical axes, chosen per argument shapes, run under `set_mesh`.

    Call it like `fn` (arguments are placed on the mesh first); `shardings(*args)` gives (in_shardings,
    out_shardings); `compile(*args)` the compiled executable (`.memory_analysis()`: per-device bytes).
    """

    def __init__(self, fn: Callable, mesh: Mesh, rules: RulesLike, arg_axes: Sequence[ArgAxes], out_axes: ArgAxes):
        self.fn, self.mesh, self.rules = fn, mesh, as_rules(rules)
        self.arg_axes, self.out_axes = tuple(arg_axes), out_axes
        self._jitted: dict = {}
        self._compiled: dict = {}

    def _in(self, args) -> tuple:
        if len(args) > len(self.arg_axes):
            raise TypeError(f"expected at most {len(self.arg_axes)} arguments, got {len(args)}.")
        return tuple(tree_shardings(arg, axes, self.mesh, self.rules) for axes, arg in zip(self.arg_axes, args))

    @staticmethod
    def _key(args) -> Any:
        return jax.tree_util.tree_structure(args), tuple(
            (np.shape(x), str(_dtype(x))) for x in jax.tree_util.tree_leaves(args))

    def shardings(self, *args) -> tuple[tuple, Any]:
        """(in_shardings, out_shardings) for these arguments (arrays or ShapeDtypeStructs)."""
        in_shardings = self._in(args)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), args)
        out = jax.eval_shape(self.fn, *abstract)
        return in_shardings, tree_shardings(out, self.out_axes, self.mesh, self.rules)

    def jitted(self, *args) -> Callable:
        """The `jax.jit(fn, in_shardings=, out_shardings=)` object for arguments of these shapes (cached)."""
        key = self._key(args)
        if key not in self._jitted:
            in_shardings, out_shardings = self.shardings(*args)
            # keep_unused: params a function does not read (the prefill's unused last layers) still sit in HBM,
            # so the compiled program's argument bytes (`compile(...).memory_analysis()`) count them.
            self._jitted[key] = jax.jit(self.fn, in_shardings=in_shardings, out_shardings=out_shardings,
                                        keep_unused=True)
        return self._jitted[key]

    def compile(self, *args):
        """The compiled executable for these argument shapes (cached; arrays or ShapeDtypeStructs)."""
        key = self._key(args)
        if key not in self._compiled:
            abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), args)
            with jax.set_mesh(self.mesh):
                self._compiled[key] = self.jitted(*args).lower(*abstract).compile()
        return self._compiled[key]

    def place(self, *args) -> tuple:
        """The arguments placed on the mesh as the executable expects them (no copy where already there)."""
        in_shardings = self._in(args)
        return tuple(None if a is None else jax.tree_util.tree_map(put, a, s) for a, s in zip(args, in_shardings))

    def __call__(self, *args):
        args = jax.tree_util.tree_map(lambda a: a if isinstance(a, jax.Array) else np.asarray(a), args)
        placed = self.place(*args)
        with jax.set_mesh(self.mesh):
            return self.compile(*args)(*placed)


__all__ = [
    "MESH_AXES", "LOGICAL_AXES", "RULE_SETS", "Rules", "Layout", "as_rules", "extend_rules", "mesh_shape",
    "parse_mesh", "make_mesh", "abstract_mesh", "resolve", "logical_spec", "logical_sharding", "logical_axes",
    "ParamAxes", "register_param_axes",
    "param_layouts", "param_shardings", "put", "shard_params", "abstract_params", "activation_hook", "on_mesh",
    "bytes_per_device", "tree_bytes", "layout_table", "print_layout", "ShardedFunction", "tree_shardings",
    "EntryAxes", "FORWARD_AXES",
    "KV_AXES", "KV_AXES_FN", "LATENT_AXES", "TOKEN_AXES", "BATCH_AXES", "REPLICATED",
]
