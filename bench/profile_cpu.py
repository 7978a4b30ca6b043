"""Where one row of bench/cpu_vs_torch.py spends its time on the CPU, op by op, on both sides: the JAX profiler's
trace of the compiled program (op durations read from its Perfetto JSON, each op labelled from the compiled HLO:
GEMM, conv, elementwise / reduction fusion, copy / transpose) and torch.profiler's key_averages table of the
PyTorch side. Same rows, flags and sizes as cpu_vs_torch.py; docs/performance.md explains the output.

  python bench/profile_cpu.py                               # the forward: sd3-medium width, 4 layers, 512 px
  python bench/profile_cpu.py --row lora-step --side jax    # the CustomShift LoRA training step, JAX only
  python bench/profile_cpu.py --row vae-decode --top 15
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

from _common import cpu_description, describe_cpu_line, setup_jax

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(")


def hlo_index(hlo: str) -> tuple[dict[str, tuple[str, str, str]], dict[str, str]]:
    """({instruction: (result shape, opcode, whole line)}, {computation: body}) of an HLO module's text."""
    instrs, comps, current = {}, {}, None
    for line in hlo.splitlines():
        head = _HEADER.match(line)
        if head:
            current = head.group(1)
            comps[current] = ""
            continue
        if current is not None:
            comps[current] += line + "\n"
        m = _INSTR.match(line)
        if m:
            instrs[m.group(1)] = (m.group(2), m.group(3), line.strip())
    return instrs, comps


def op_kind(name: str, instrs: dict, comps: dict) -> str:
    """GEMM, conv, copy/transpose, elementwise/reduce fusion, ... of one executed op, from the compiled HLO."""
    shape, opcode, line = instrs.get(name, ("?", name.split(".")[0], ""))
    body = line
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called:
        body += comps.get(called.group(1), "")
    if " dot(" in body or opcode == "dot":
        return "GEMM"
    if " convolution(" in body or opcode == "convolution":
        return "conv"
    if opcode in ("copy", "transpose") or re.search(r" (transpose|copy)\(", body) and " reduce(" not in body:
        return "copy/transpose"
    if " reduce(" in body:
        return "reduction fusion"
    if opcode in ("while", "call", "conditional"):
        return "control"
    return "elementwise fusion" if opcode == "fusion" else opcode


def dot_shapes(name: str, instrs: dict, comps: dict) -> str:
    """'lhs x rhs -> out' of the dot inside an op, from its HLO (empty when none)."""
    _, _, line = instrs.get(name, ("", "", ""))
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = line + "\n" + (comps.get(called.group(1), "") if called else "")
    m = re.search(r"= (\S+) dot\(([^)]*)\)", body)
    if not m:
        return ""
    strip = lambda shape: re.sub(r"\{[\d,]*\}", "", shape)  # noqa: E731  (drop the layout)
    operands = [strip(instrs.get(op, (op,))[0]) for op in re.findall(r"%([\w.\-]+)", m.group(2))]
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}, rhs_contracting_dims=\{([\d,]*)\}", body)
    contract = f" contract {dims.group(1)}/{dims.group(2)}" if dims else ""
    return f"{' x '.join(operands)} -> {strip(m.group(1))}{contract}"


def jax_profile(compiled, args, runs: int, top: int) -> None:
    """Trace `runs` calls of `compiled`, then print per-op time per run, its share, kind and GEMM shapes."""
    import jax

    hlo = compiled.as_text()
    instrs, comps = hlo_index(hlo)
    folder = tempfile.mkdtemp(prefix="jax_trace_")
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(runs):
            jax.block_until_ready(compiled(*args))
    path = sorted(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True))[-1]
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    dur, count, op_threads = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in instrs:
            dur[e["name"]] += e.get("dur", 0) / runs
            count[e["name"]] += 1 / runs
            op_threads[threads.get((e["pid"], e["tid"]), str(e["tid"]))] += e.get("dur", 0) / runs
    total = sum(dur.values())
    print(f"\n== JAX (XLA:CPU) ops, per run (sum of op time {total / 1e3:.1f} ms; trace {path})")
    by_kind = collections.Counter()
    for name, d in dur.items():
        by_kind[op_kind(name, instrs, comps)] += d
    for kind, d in by_kind.most_common():
        print(f"  {kind:20s} {d / 1e3:9.1f} ms  {100 * d / total:5.1f}%")
    print("  op time by thread: " + ", ".join(f"{t} {d / 1e3:.0f} ms" for t, d in op_threads.most_common()))
    print(f"\n  {'ms/run':>8s} {'%':>5s} {'calls':>5s}  {'op':28s} {'kind':18s} shapes")
    for name, d in dur.most_common(top):
        kind = op_kind(name, instrs, comps)
        shapes = dot_shapes(name, instrs, comps) or instrs[name][0]
        print(f"  {d / 1e3:8.2f} {100 * d / total:5.1f} {count[name]:5.0f}  {name[:28]:28s} {kind:18s} {shapes[:90]}")


def torch_profile(run, runs: int, top: int) -> None:
    """torch.profiler over `runs` calls of `run`: key_averages by op and by op and input shapes, by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(runs):
            run()
    print(f"\n== PyTorch ops over {runs} runs (torch threads {torch.get_num_threads()})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top,
                                                             max_name_column_width=28, max_shapes_column_width=70))


def main(argv=None) -> None:
    from cpu_vs_torch import ROWS, build_case, parse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--row", default="forward", choices=ROWS, help="which row of cpu_vs_torch.py to profile")
    extra.add_argument("--top", type=int, default=25, help="ops listed per side")
    extra.add_argument("--side", default="both", choices=["both", "jax", "torch"])
    mine, rest = extra.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        extra.print_help()
        print("\nand the sizes of bench/cpu_vs_torch.py (--runs: profiled runs of each side, after one warm-up):")
    args = parse(rest)
    setup_jax()
    print(describe_cpu_line(cpu_description()))
    case = build_case(mine.row, args)
    try:
        print(f"{mine.row}: {case.shape} (jax compile {case.compile_s:.1f} s)")
        if mine.side in ("both", "jax"):
            case.run_jax()  # warm-up
            jax_profile(case.compiled, case.jax_args, args.runs, mine.top)
        if mine.side in ("both", "torch"):
            case.run_torch()
            torch_profile(case.run_torch, args.runs, mine.top)
    finally:
        case.close()


if __name__ == "__main__":
    main()
