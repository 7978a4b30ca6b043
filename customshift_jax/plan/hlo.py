"""Reading a compiled (partitioned, per-chip) HLO module: its collectives and HBM traffic, loops counted in full.

XLA's own cost analysis counts a while loop's body once, so a model whose layers are scanned looks a few layers
deep. Here the text of `compiled.as_text()` is walked from ENTRY: a while body is weighted by its trip count
(read from its condition, `i < N`, and the loop counter's initial constant), fusions and calls are entered, and
every op is counted with the product of the trip counts around it.

Collectives: each op of kind all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute (and their
`-start` async forms, and TPU's `all-reduce-scatter` fusions, which are reduce-scatters) is counted once per
execution; a collective cloned into the start / body / done parts of an async fusion shares its channel id
and counts once. Its bytes are what one chip sends over the interconnect for it (ring algorithms):
  all-gather: result x (g-1)/g; reduce-scatter: operand x (g-1)/g; all-reduce: 2 x operand x (g-1)/g;
  all-to-all: operand x (g-1)/g; collective-permute: operand;
with g the replica-group size. Multi-slice transfers appear as host transfers to the "megascale" runtime
(send ops with `_xla_megascale_transfer_type`): those are DCN, the rest ICI.

HBM bytes: for every op outside fusion bodies, the bytes of its operands and results that live in HBM (an
array laid out in memory space S(1) is in the chip's VMEM and not counted); no-ops (tuples, bitcasts,
parameters, constants, control flow itself) are skipped.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Iterator

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e4m3": 1, "f8e3m4": 1,
}
_FREE_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
             "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-done", "send",
             "recv", "send-done", "recv-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
             "async-done", "async-update", "iota"}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = ")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: dtype, dims and whether its layout puts it in VMEM (memory space 1)."""

    dtype: str
    dims: tuple[int, ...]
    vmem: bool

    @property
    def nbytes(self) -> float:
        return DTYPE_BYTES.get(self.dtype, 4) * math.prod(self.dims)


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    shape: list[Array]
    operands: list[str]
    attrs: str
    literal: int | None = None  # an integer scalar constant's value

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{re.escape(key)}=(%?[\w.\-]+|\{{[^}}]*\}}|\"[^\"]*\")", self.attrs)
        return m.group(1) if m else None


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    by_name: dict[str, Instruction]


def parse_shape(text: str) -> list[Array]:
    """Every array in an HLO shape string (a tuple gives several)."""
    return [Array(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d),
                  bool(m.group(3) and re.search(r"S\(1\)", m.group(3))))
            for m in _ARRAY.finditer(text) if m.group(1) in DTYPE_BYTES]


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group that opens at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        shape_text, rest = rest[:end], rest[end:].lstrip()
    else:
        shape_text, _, rest = rest.partition(" ")
    op_end = rest.find("(")
    if op_end < 0:
        return None
    opcode = rest[:op_end]
    args_end = _balanced(rest, op_end)
    args = rest[op_end:args_end]
    literal = re.fullmatch(r"\((-?\d+)\)", args) if opcode in ("constant", "parameter") else None
    return Instruction(m.group(2), opcode, parse_shape(shape_text), re.findall(r"%([\w.\-]+)", args),
                       rest[args_end:], int(literal.group(1)) if literal else None)


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """(computations by name, the ENTRY computation's name) of an HLO module's text."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head and line.rstrip().endswith("{"):
            current = Computation(head.group(2), [], {})
            comps[current.name] = current
            if head.group(1):
                entry = current.name
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        instr = parse_instruction(line)
        if instr is not None:
            current.instructions.append(instr)
            current.by_name[instr.name] = instr
    if not entry:
        raise ValueError("not an HLO module: no ENTRY computation.")
    return comps, entry


def _constant_value(comp: Computation, name: str) -> int | None:
    instr = comp.by_name.get(name)
    if instr is None:
        return None
    if instr.opcode == "constant":
        return instr.literal
    if instr.opcode in ("copy", "convert", "bitcast") and instr.operands:
        return _constant_value(comp, instr.operands[0])
    return None


def trip_count(comps: dict[str, Computation], parent: Computation, loop: Instruction) -> int:
    """How many times `loop` runs its body: from its condition `counter < N` (or <=, >, >=) and the counter's
    initial constant in the tuple the loop starts from; 1 when it cannot be read (then the body counts once)."""
    cond = comps.get((loop.attr("condition") or "").lstrip("%"))
    if cond is None or not cond.instructions:
        return 1
    root = cond.instructions[-1]
    if root.opcode != "compare" or len(root.operands) != 2:
        return 1
    direction = (root.attr("direction") or "LT").upper()
    index = bound = None
    for operand in root.operands:
        value = _constant_value(cond, operand)
        if value is not None:
            bound = value
        else:
            gte = cond.by_name.get(operand)
            if gte is not None and gte.opcode == "get-tuple-element":
                index = int(gte.attr("index") or 0)
    if bound is None or index is None:
        return 1
    start = 0
    init = parent.by_name.get(loop.operands[0]) if loop.operands else None
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
        start = _constant_value(parent, init.operands[index]) or 0
    n = {"LT": bound - start, "LE": bound - start + 1, "GT": start - bound, "GE": start - bound + 1}.get(direction, 1)
    return max(int(n), 1)


def group_size(instr: Instruction, default: int) -> int:
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", instr.attrs)
    if mesh:  # mesh['axis_0'=32,'axis_1'=1] {'axis_0'}: the product of the named axes' sizes
        sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", mesh.group(2))) or default
    groups = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?|\{[^=]*?\}\})", instr.attrs)
    if not groups:
        pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", instr.attrs)
        return 2 if pairs else default
    text = groups.group(1)
    if text.startswith("["):  # iota form [G,S]<=[...]: groups of S
        return int(text[1:text.index("]")].split(",")[-1])
    first = re.search(r"\{\{([\d,]*)\}", text)
    return len(first.group(1).split(",")) if first and first.group(1) else default


@dataclasses.dataclass
class CollectiveStats:
    count: float = 0
    bytes: float = 0
    async_count: float = 0


@dataclasses.dataclass
class ModuleStats:
    """Per-chip totals of one execution of a compiled program (loops counted in full)."""

    ici: dict[str, CollectiveStats]
    dcn: dict[str, CollectiveStats]
    hbm_bytes: float
    loops: list[tuple[str, int]]  # (while op, trip count) as found

    def collectives(self) -> dict[str, dict[str, float]]:
        """{kind: {count, bytes, async_count, ici_bytes, dcn_bytes}} over both networks."""
        out: dict[str, dict[str, float]] = {}
        for kind in COLLECTIVE_KINDS:
            i, d = self.ici.get(kind, CollectiveStats()), self.dcn.get(kind, CollectiveStats())
            if i.count or d.count:
                out[kind] = {"count": i.count + d.count, "bytes": i.bytes + d.bytes, "async_count": i.async_count,
                             "ici_bytes": i.bytes, "dcn_bytes": d.bytes}
        return out

    @property
    def ici_bytes(self) -> float:
        return sum(s.bytes for s in self.ici.values())

    @property
    def dcn_bytes(self) -> float:
        return sum(s.bytes for s in self.dcn.values())


def _kind(instr: Instruction, comp: Computation) -> tuple[str, bool] | None:
    op = instr.opcode
    is_async = op.endswith("-start")
    base = op[:-len("-start")] if is_async else op
    if base not in COLLECTIVE_KINDS:
        return None
    if base == "all-reduce" and comp.name.startswith("all-reduce-scatter"):
        return "reduce-scatter", is_async
    return base, is_async


def _traffic(kind: str, instr: Instruction, comp: Computation, group: int) -> float:
    result = sum(a.nbytes for a in instr.shape[:1])
    operand = sum(a.nbytes for name in instr.operands[:1] if name in comp.by_name
                  for a in comp.by_name[name].shape[:1]) or result
    share = (group - 1) / group if group > 1 else 0.0
    if kind == "all-gather":
        return result * share
    if kind == "all-reduce":
        return 2 * operand * share
    if kind == "collective-permute":
        return operand
    return operand * share  # reduce-scatter, all-to-all


_SLICING = ("dynamic-slice", "slice", "gather")


def _operand_bytes(instr: Instruction, comps: dict[str, Computation], k: int, full: float) -> float:
    """Bytes operand `k` of a fusion really moves: a stacked (scanned) buffer that the fusion only slices is
    read for the slices' sizes; one it updates in place (dynamic-update-slice) is not read at all."""
    callee = comps.get((instr.attr("calls") or "").lstrip("%")) if instr.opcode == "fusion" else None
    if callee is None:
        return full
    params = [i for i in callee.instructions if i.opcode == "parameter" and i.literal == k]
    if not params:
        return full
    name = params[0].name
    users = [i for i in callee.instructions if name in i.operands]
    if users and all(u.opcode in _SLICING or (u.opcode == "dynamic-update-slice" and u.operands[0] == name)
                     for u in users):
        return sum(sum(a.nbytes for a in u.shape) for u in users if u.opcode in _SLICING)
    return full


def _result_bytes(instr: Instruction, comps: dict[str, Computation]) -> float:
    """An in-place dynamic-update-slice (alone or as a fusion's root) writes only its update."""
    arrays = [a for a in (instr.shape[:1] if instr.opcode == "copy-start" else instr.shape) if not a.vmem]
    callee = comps.get((instr.attr("calls") or "").lstrip("%")) if instr.opcode == "fusion" else None
    root = callee.instructions[-1] if callee is not None and callee.instructions else None
    updates = []
    if root is not None and root.opcode == "dynamic-update-slice":
        updates = [root]
    elif root is not None and root.opcode == "tuple":
        updates = [callee.by_name[o] for o in root.operands
                   if o in callee.by_name and callee.by_name[o].opcode == "dynamic-update-slice"]
    if not updates:
        return sum(a.nbytes for a in arrays)
    written = sum(sum(a.nbytes for a in callee.by_name[u.operands[1]].shape) for u in updates
                  if len(u.operands) > 1 and u.operands[1] in callee.by_name)
    replaced = sum(sum(a.nbytes for a in u.shape) for u in updates)
    return max(sum(a.nbytes for a in arrays) - replaced, 0) + written


def _hbm_bytes(instr: Instruction, comp: Computation, comps: dict[str, Computation]) -> float:
    if instr.opcode in _FREE_OPS or (instr.opcode == "custom-call" and "AllocateBuffer" in instr.attrs):
        return 0.0
    total = _result_bytes(instr, comps)
    for k, name in enumerate(instr.operands):
        producer = comp.by_name.get(name)
        if producer is not None:
            total += _operand_bytes(instr, comps, k, sum(a.nbytes for a in producer.shape if not a.vmem))
    return total


def analyze(text: str, default_group: int | None = None) -> ModuleStats:
    """Walk the module from ENTRY; see the module doc for what is counted and how. A collective without
    replica groups spans every partition (`default_group`: read from the module's num_partitions)."""
    comps, entry = parse_module(text)
    if default_group is None:
        m = re.search(r"num_partitions=(\d+)", text[:2000])
        default_group = int(m.group(1)) if m else 1
    ici: dict[str, CollectiveStats] = defaultdict(CollectiveStats)
    dcn: dict[str, CollectiveStats] = defaultdict(CollectiveStats)
    loops: list[tuple[str, int]] = []
    hbm = 0.0

    def walk(comp: Computation, weight: float, seen: set[str], inside_fusion: bool, depth: int = 0) -> None:
        nonlocal hbm
        if depth > 64:
            return
        for instr in comp.instructions:
            if not inside_fusion:
                hbm += weight * _hbm_bytes(instr, comp, comps)
            kind = _kind(instr, comp)
            if kind is not None:
                channel = instr.attr("channel_id") or instr.name
                if channel not in seen:
                    seen.add(channel)
                    stats = ici[kind[0]]
                    stats.count += weight
                    stats.async_count += weight if kind[1] else 0
                    stats.bytes += weight * _traffic(kind[0], instr, comp, group_size(instr, default_group))
            elif instr.opcode == "send" and "_xla_megascale_transfer_type" in instr.attrs:
                m = re.search(r'_xla_megascale_transfer_type="(\w+)"', instr.attrs)
                dcn_kind = (m.group(1) if m else "ALL_REDUCE").lower().replace("_", "-")
                dcn_kind = dcn_kind if dcn_kind in COLLECTIVE_KINDS else "all-reduce"
                stats = dcn[dcn_kind]
                stats.count += weight
                stats.bytes += weight * sum(a.nbytes for a in instr.shape[:1])
            if instr.opcode == "while":
                n = trip_count(comps, comp, instr)
                loops.append((instr.name, n))
                body = comps.get((instr.attr("body") or "").lstrip("%"))
                cond = comps.get((instr.attr("condition") or "").lstrip("%"))
                if body is not None:
                    walk(body, weight * n, set(), False, depth + 1)
                if cond is not None:
                    walk(cond, weight * (n + 1), set(), False, depth + 1)
                continue
            for key in ("calls", "to_apply", "true_computation", "false_computation"):
                target = instr.attr(key)
                if target and instr.opcode not in ("all-reduce", "reduce-scatter", "reduce", "reduce-window",
                                                   "scatter", "select-and-scatter", "sort", "map"):
                    callee = comps.get(target.lstrip("%"))
                    if callee is not None:
                        fused = inside_fusion or instr.opcode == "fusion"
                        walk(callee, weight, seen if instr.opcode == "fusion" else set(), fused, depth + 1)
            branches = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
            if branches:
                for target in re.findall(r"%([\w.\-]+)", branches.group(1)):
                    if target in comps:
                        walk(comps[target], weight, set(), inside_fusion, depth + 1)

    walk(comps[entry], 1.0, set(), False)
    return ModuleStats(dict(ici), dict(dcn), hbm, loops)


def iter_collective_lines(text: str) -> Iterator[str]:
    """The module's collective instructions as text (for --verbose listings)."""
    for line in text.splitlines():
        if re.search(r"= .*\b(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start)?\(", line):
            yield line.strip()[:200]
