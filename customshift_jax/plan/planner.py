"""One plan: compile a workload's entry point for a pod and read per-chip memory, FLOPs, collectives and a
roofline off the compiled program (what `customshift plan` prints and writes with --json)."""
from __future__ import annotations

import re
import time
from typing import Any

import jax

from customshift_jax.parallel import sharding as shd
from customshift_jax.plan import hlo
from customshift_jax.plan.flops import count_flops
from customshift_jax.plan.pod import Pod, pod_mesh
from customshift_jax.plan.tasks import Workload, build

GIB = 1024 ** 3


def _memory(compiled: Any, hbm: int) -> dict[str, Any]:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
            "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes),
            "generated_code": int(m.generated_code_size_in_bytes), "total": int(total), "fits": total <= hbm,
            "margin": int(hbm - total)}


def _xla_flops(compiled: Any) -> float:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # noqa: BLE001 - cost analysis is optional information
        return 0.0


def _batch_layout(pod: Pod, mesh: Any, rules: Any, global_batch: int) -> dict[str, Any]:
    """How the global batch is split: per device, per process (the rows each host's data loader reads)."""
    layout = shd.resolve(("batch",), (global_batch,), mesh, rules)
    ways = global_batch // layout.shard_shape[0]
    return {"spec": str(layout.spec), "per_device": layout.shard_shape[0], "ways": ways,
            "per_process": global_batch // pod.hosts if global_batch % pod.hosts == 0 else None,
            "note": "; ".join(layout.notes)}


def roofline(pod: Pod, flops_per_device: float, hbm_bytes: float, ici_bytes: float, dcn_bytes: float,
             items: int) -> dict[str, float]:
    """Lower bounds on one call's time from each resource, at the chip's peak figures (hardware.CHIPS)."""
    chip, share = pod.chip, pod.per_device
    compute = flops_per_device / (chip.peak_bf16_flops * share)
    memory = hbm_bytes / (chip.hbm_bytes_per_s * share)
    collective = ici_bytes / (chip.ici_bytes_per_s * share) + dcn_bytes / (chip.dcn_bytes_per_s * share)
    step = max(compute, memory, collective, 1e-12)
    return {"compute_s": compute, "memory_s": memory, "collective_s": collective, "step_s": step,
            "mfu_ceiling": compute / step, "items_per_s": items / step,
            "bound_by": max((("compute", compute), ("memory", memory), ("collectives", collective)),
                            key=lambda kv: kv[1])[0]}


def plan(pod: Pod, workload: Workload, mesh_sizes: dict[str, int], rules: str, *, model_name: str = "",
         keep_hlo: bool = False) -> dict[str, Any]:
    """Compile `workload` for `pod` on the mesh of `mesh_sizes` under `rules`; the report as one dict."""
    mesh = pod_mesh(pod, mesh_sizes)
    target = build(workload, mesh, rules)
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = target.jitted().lower(*target.args).compile()
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a program that cannot fit; anything else is raised
        compiled, needed = None, _refused_bytes(str(e))
        if needed is None:
            raise
    seconds = time.perf_counter() - start
    flops = count_flops(target.fn, *target.args)
    n = len(pod.devices)
    hbm = pod.hbm_bytes_per_device
    if compiled is None:
        memory = {"arguments": None, "outputs": None, "temporaries": None, "aliased": None, "generated_code": None,
                  "total": needed, "fits": False, "margin": int(hbm - needed), "refused_by_compiler": True}
        stats = hlo.ModuleStats({}, {}, 0.0, [])
    else:
        memory = _memory(compiled, hbm)
        stats = hlo.analyze(compiled.as_text())
    report = {
        "topology": pod.topology, "num_slices": pod.num_slices, "chips": pod.chips, "devices": n,
        "hosts": pod.hosts, "devices_per_host": n // pod.hosts, "device_kind": pod.device_kind,
        "hbm_bytes_per_chip": pod.chip.hbm_bytes, "hbm_bytes_per_device": pod.hbm_bytes_per_device,
        "task": workload.task, "model": model_name, "mesh": dict(mesh.shape), "rules": rules,
        "global_batch": workload.global_batch, "resolution": workload.resolution, "dtype": workload.dtype,
        "attention": workload.attention, "remat": workload.remat, "lora_rank": workload.lora_rank,
        "steps": workload.steps if workload.task == "sample" else 1,
        "batch": _batch_layout(pod, mesh, rules, workload.global_batch),
        "memory": memory,
        "flops_per_step": flops, "flops_per_device": flops / n, "xla_flops_per_device": _xla_flops(compiled),
        "hbm_bytes_accessed_per_device": stats.hbm_bytes,
        "collectives": stats.collectives(), "ici_bytes_per_device": stats.ici_bytes,
        "dcn_bytes_per_device": stats.dcn_bytes, "loops": [n for _, n in stats.loops],
        "compile_seconds": seconds, "items": target.item, "items_per_call": target.items_per_call,
    }
    report["roofline"] = None if compiled is None else roofline(pod, flops / n, stats.hbm_bytes, stats.ici_bytes,
                                                                 stats.dcn_bytes, target.items_per_call)
    if keep_hlo and compiled is not None:
        report["hlo"] = compiled.as_text()
    return report


def _refused_bytes(message: str) -> int | None:
    """The bytes XLA:TPU said a program needs when it refused it for HBM ("... required ... (30.81G) exceeds
    available HBM (15.75G)"); None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message or "HBM" not in message:
        return None
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds", message)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _seconds(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def summary(r: dict[str, Any]) -> str:
    """The plan as the lines `customshift plan` prints."""
    m, rf = r["memory"], r["roofline"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    verdict = (f"fits, {gib(m['margin'])} to spare" if m["fits"] else f"does NOT fit: {gib(-m['margin'])} over")
    b = r["batch"]
    if m.get("refused_by_compiler"):
        memory_line = (f"memory per device: XLA:TPU refused the program: it needs {gib(m['total'])} of "
                       f"{gib(r['hbm_bytes_per_device'])} HBM: {verdict}")
    else:
        memory_line = (f"memory per device: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])}, temporaries "
                       f"{gib(m['temporaries'])}, total {gib(m['total'])} of {gib(r['hbm_bytes_per_device'])} HBM: "
                       f"{verdict}")
    lines = [
        f"{r['task']} of {r['model']} at {r['resolution']} px, global batch {r['global_batch']}, {r['dtype']}, "
        f"attention {r['attention']}, remat {r['remat']}",
        f"pod: {r['topology']} x {r['num_slices']} slice(s): {r['chips']} chips ({r['device_kind']}), "
        f"{r['hosts']} hosts x {r['devices_per_host']} devices; mesh {mesh}, rules {r['rules']}",
        f"batch: {b['per_device']} per device, split {b['ways']} ways ({b['spec']})"
        + (f", {b['per_process']} per process (host)" if b["per_process"] else ", does not split over the hosts")
        + (f"; {b['note']}" if b["note"] else ""),
        memory_line,
        f"FLOPs per step: {r['flops_per_step']:.4g} ({r['flops_per_device']:.4g} per device; XLA's cost analysis, "
        f"scan bodies once: {r['xla_flops_per_device']:.4g})",
        f"HBM traffic per device: {gib(r['hbm_bytes_accessed_per_device'])}; collectives per device: ICI "
        f"{gib(r['ici_bytes_per_device'])}, DCN {gib(r['dcn_bytes_per_device'])}",
    ]
    for kind, c in r["collectives"].items():
        lines.append(f"  {kind:<19} {c['count']:>7.0f} x, {gib(c['bytes']):>11}"
                     + (f" ({c['async_count']:.0f} async)" if c["async_count"] else "")
                     + (f" (DCN {gib(c['dcn_bytes'])})" if c["dcn_bytes"] else ""))
    if rf is None:
        lines.append(f"compiled (and refused) in {r['compile_seconds']:.1f} s")
        return "\n".join(lines)
    lines.append(f"roofline: compute {_seconds(rf['compute_s'])}, HBM {_seconds(rf['memory_s'])}, collectives "
                 f"{_seconds(rf['collective_s'])} -> step >= {_seconds(rf['step_s'])} ({rf['bound_by']}-bound), "
                 f"MFU <= {rf['mfu_ceiling']:.0%}, <= {rf['items_per_s']:.3g} {r['items']}/s")
    lines.append(f"compiled in {r['compile_seconds']:.1f} s")
    return "\n".join(lines)


def knob_hint(r: dict[str, Any]) -> str:
    """What to try when a plan does not fit."""
    hints = []
    if r["remat"] != "full" and r["task"].startswith("train"):
        hints.append("--remat full")
    if r["rules"] in ("dp", "tp"):
        hints.append("--rules fsdp (or fsdp_tp)")
    if r["batch"]["per_device"] > 1:
        hints.append("a smaller --batch")
    if r["dtype"] != "bfloat16":
        hints.append("--dtype bf16")
    hints.append("a larger topology")
    return ", ".join(hints)


TIE_FRACTION = 0.02  # step bounds this close are a tie for `best`


def best(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The report with the fastest step bound among those that fit (None: none fits). Bounds within
    TIE_FRACTION of the fastest are a tie, broken by fewer collective bytes: the bound assumes perfect overlap, so
    of two equal bounds the one that moves less over the network is the safer plan."""
    fitting = [r for r in reports if r.get("memory", {}).get("fits") and r.get("roofline")]
    if not fitting:
        return None
    fastest = min(r["roofline"]["step_s"] for r in fitting)
    tied = [r for r in fitting if r["roofline"]["step_s"] <= fastest * (1 + TIE_FRACTION)]
    return min(tied, key=lambda r: (r.get("ici_bytes_per_device", 0) + r.get("dcn_bytes_per_device", 0),
                                    r["roofline"]["step_s"]))
