"""TPU generations: the public per-chip figures the roofline uses, one table, each with its source.

Sources (Google Cloud TPU documentation, "System architecture" pages of each version):
  v4   docs.cloud.google.com/tpu/docs/v4:   275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; ICI: 6 links of 50 GB/s each
       way (the TPU v4 paper, ISCA 2023), taken as 300 GB/s per chip each way; DCN not published per chip: 25 Gb/s.
  v5e  docs.cloud.google.com/tpu/docs/v5e:  197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, 400 GB/s bidirectional ICI
       per chip, 2 x 100 Gb/s NICs per 8-chip host (25 Gb/s per chip of DCN).
  v5p  docs.cloud.google.com/tpu/docs/v5p:  459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, 1200 GB/s bidirectional ICI
       per chip, 50 Gb/s of DCN per chip.
  v6e  docs.cloud.google.com/tpu/docs/v6e:  918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, 800 GB/s bidirectional ICI per
       chip; DCN per chip not published there: v5e's 25 Gb/s is assumed.
The roofline uses half the bidirectional ICI figure (what one chip can send while it receives as much).
"""
from __future__ import annotations

import dataclasses

GB = 1e9
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's per-chip figures (bytes and seconds; see the module doc for sources)."""

    name: str
    device_kinds: tuple[str, ...]   # what `jax.Device.device_kind` says for it
    peak_bf16_flops: float          # FLOP/s
    hbm_bytes: int
    hbm_bytes_per_s: float
    ici_bytes_per_s: float          # one direction, per chip
    dcn_bytes_per_s: float          # per chip
    chips_per_host: int
    source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", ("TPU v4",), 275e12, 32 * GIB, 1200 * GB, 300 * GB, 25e9 / 8, 4,
               "docs.cloud.google.com/tpu/docs/v4; ICI from the TPU v4 paper; DCN assumed"),
    "v5e": Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GIB, 819 * GB, 200 * GB, 25e9 / 8, 8,
                "docs.cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", ("TPU v5", "TPU v5p"), 459e12, 95 * GIB, 2765 * GB, 600 * GB, 50e9 / 8, 4,
                "docs.cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GIB, 1638 * GB, 400 * GB, 25e9 / 8, 8,
                "docs.cloud.google.com/tpu/docs/v6e; DCN assumed as v5e's"),
}

# Topology names libtpu knows, by the names people rent them under (chips = product of the dims).
KNOWN_TOPOLOGIES: dict[str, str] = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4", "v4-256": "v4:4x4x8",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8",
    "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-64": "v5p:2x4x4", "v5p-128": "v5p:4x4x4",
    "v5p-256": "v5p:4x4x8", "v5p-512": "v5p:4x8x8",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8", "v6e-64": "v6e:8x8",
    "v6e-128": "v6e:8x16", "v6e-256": "v6e:16x16",
}


def chip_for(topology: str) -> Chip:
    """The generation of a topology name such as "v5p:4x4x4" or "v5e-16"."""
    gen = topology.split(":")[0].split("-")[0].lower()
    if gen not in CHIPS:
        raise ValueError(f"unknown TPU generation in {topology!r}; known: {', '.join(CHIPS)}.")
    return CHIPS[gen]


def canonical_topology(name: str) -> str:
    """"v5p-64" -> "v5p:2x4x4"; "v5p:2x4x4" unchanged; anything else: a one-line error listing the known ones."""
    name = name.strip()
    if name in KNOWN_TOPOLOGIES:
        return KNOWN_TOPOLOGIES[name]
    gen, sep, dims = name.partition(":")
    if sep and gen in CHIPS and dims and all(d.isdigit() and int(d) > 0 for d in dims.split("x")):
        return name
    raise ValueError(f"unknown topology {name!r}; give GEN:AxB[xC] (e.g. v5p:4x4x4, v5e:4x4) or one of "
                     f"{', '.join(KNOWN_TOPOLOGIES)}.")
