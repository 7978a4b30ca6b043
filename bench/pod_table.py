"""README's pod table: the TPU compiler's plans for SD3-medium and SD3.5-large, CustomShift LoRA training and
28-step sampling at 1024 px, on v5e / v5p / v6e slices; the best rule set that fits per row.

Each compile is one `customshift_jax.plan.planner.plan` (the same as `customshift plan`); results go to a JSONL
file one line per compile, so an interrupted run resumes where it stopped. Run it in the background:

    nohup python bench/pod_table.py --out bench/pod_table.jsonl > pod_table.log 2>&1 &
    python bench/pod_table.py --out bench/pod_table.jsonl --table   # the markdown table of what is done

Global batch: one image per chip. Candidates per row: rules fsdp (mesh fsdp=-1), dp for sampling (data=-1) and
fsdp_tp (tensor = the largest of 8, 4, 2 dividing the heads), remat full for training (none for sampling), bf16,
attention xla (`--attention flash` adds the Pallas kernels' rows, shown in the last column).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = ("sd3-medium", "sd3.5-large")
TASKS = ("train-lora", "sample")
TOPOLOGIES = ("v5e-16", "v5e-64", "v5e-256", "v5p-8", "v5p-64", "v5p-256", "v6e-8", "v6e-64", "v6e-256")
GIB = 1024 ** 3


def candidates(heads: int, chips: int, task: str) -> list[tuple[str, dict, str]]:
    tensor = next(t for t in (8, 4, 2, 1) if heads % t == 0 and chips % t == 0)
    remat = "full" if task.startswith("train") else "none"
    out = [("fsdp", {"fsdp": -1}, remat)]
    if not task.startswith("train"):  # sampling holds no optimizer state: whole weights per chip may fit
        out.append(("dp", {"data": -1}, remat))
    if tensor > 1:
        out.append(("fsdp_tp", {"fsdp": -1, "tensor": tensor}, remat))
    return out


def key(rec: dict) -> tuple:
    k = (rec["model"], rec["task"], rec["topology_name"], rec["rules"], rec["remat"])
    return k + ((rec["attention"],) if rec.get("attention", "xla") != "xla" else ())


def run(out: Path, models, tasks, topologies, rule_sets, attention: str = "xla") -> None:
    from customshift_jax.models.mmdit.config import get_preset
    from customshift_jax.plan.planner import plan
    from customshift_jax.plan.pod import load_pod
    from customshift_jax.plan.tasks import Workload

    old = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {key(r) for r in old if "error" not in r}  # errors are tried again
    for topo in topologies:
        pod = load_pod(topo)
        for model in models:
            config = get_preset(model)
            for task in tasks:
                for rules, mesh, remat in candidates(config.num_attention_heads, len(pod.devices), task):
                    k = (model, task, topo, rules, remat) + ((attention,) if attention != "xla" else ())
                    if k in done or rules not in rule_sets:
                        continue
                    work = Workload(config, task, 1024, len(pod.devices), remat=remat, attention=attention)
                    start = time.time()
                    try:
                        rec = plan(pod, work, mesh, rules, model_name=model, keep_hlo=True)
                        hlo_file = out.parent / "hlo" / ("_".join(k) + ".txt.gz")
                        hlo_file.parent.mkdir(exist_ok=True)
                        hlo_file.write_bytes(gzip.compress(rec.pop("hlo", "").encode()))
                    except Exception as e:  # noqa: BLE001 - recorded, the table says so
                        rec = {"model": model, "task": task, "rules": rules, "remat": remat, "attention": attention,
                               "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    rec["topology_name"] = topo
                    with out.open("a") as f:
                        f.write(json.dumps(rec, default=str) + "\n")
                    print(f"{topo} {model} {task} {rules} {remat}: {time.time() - start:.0f} s", flush=True)


def reanalyze(out: Path) -> None:
    """Recompute collectives, HBM traffic and the roofline of every record from its saved HLO (no compile)."""
    from customshift_jax.plan import hlo
    from customshift_jax.plan.planner import roofline
    from customshift_jax.plan.pod import load_pod

    recs = [json.loads(line) for line in out.read_text().splitlines()]
    for rec in recs:
        hlo_file = out.parent / "hlo" / ("_".join(key(rec)) + ".txt.gz")
        if "error" in rec or not hlo_file.exists() or rec.get("roofline") is None:
            continue
        stats = hlo.analyze(gzip.decompress(hlo_file.read_bytes()).decode())
        rec.update(collectives=stats.collectives(), ici_bytes_per_device=stats.ici_bytes,
                   dcn_bytes_per_device=stats.dcn_bytes, hbm_bytes_accessed_per_device=stats.hbm_bytes,
                   loops=[n for _, n in stats.loops])
        rec["roofline"] = roofline(load_pod(rec["topology_name"]), rec["flops_per_device"], stats.hbm_bytes,
                                   stats.ici_bytes, stats.dcn_bytes, rec["items_per_call"])
    out.write_text("".join(json.dumps(r, default=str) + "\n" for r in recs))


def table(out: Path) -> str:
    from customshift_jax.plan.planner import best

    recs = [json.loads(line) for line in out.read_text().splitlines()]
    rows = ["| model | task | slice | chips | best rules (mesh), remat | HBM GiB / chip | step >= | images/s <= | "
            "MFU <= | bound | collective GiB / chip | flash: HBM GiB, step >=, images/s <= |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for r in recs:
        groups.setdefault((r["model"], r["task"], r["topology_name"]), []).append(r)
    order = {t: i for i, t in enumerate(TOPOLOGIES)}
    for (model, task, topo), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 99))):
        ok = [r for r in rs if "error" not in r]
        xla = [r for r in ok if r.get("attention", "xla") == "xla"]
        flash_runs = [r for r in ok if r.get("attention") == "flash"]
        flash = best(flash_runs)
        per = "loop" if task == "sample" else "step"
        flash_cell = (f"{flash['memory']['total'] / GIB:.1f}, {flash['roofline']['step_s']:.3g} s, "
                      f"{flash['roofline']['items_per_s']:.3g}" if flash else
                      f"none fits ({min(r['memory']['total'] for r in flash_runs) / GIB:.1f} needed)" if flash_runs
                      else "")
        b = best(xla)
        if b is None:
            need = min((r["memory"]["total"] for r in xla), default=None)
            chips = next((r["chips"] for r in ok), "")
            rows.append(f"| {model} | {task} | {topo} | {chips} | none fits | "
                        f"{f'{need / GIB:.1f} needed' if need else 'error'} | | | | | | {flash_cell} |")
            continue
        m, rf = b["memory"], b["roofline"]
        mesh = ",".join(f"{k}={v}" for k, v in b["mesh"].items() if v > 1)
        rows.append(f"| {model} | {task} | {topo} | {b['chips']} | {b['rules']} ({mesh}), {b['remat']} | "
                    f"{m['total'] / GIB:.1f} of {b['hbm_bytes_per_device'] / GIB:.0f} | {rf['step_s']:.3g} s / {per} | "
                    f"{rf['items_per_s']:.3g} | {rf['mfu_ceiling']:.0%} | {rf['bound_by']} | "
                    f"{(b['ici_bytes_per_device'] + b['dcn_bytes_per_device']) / GIB:.2f} | {flash_cell} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/pod_table.jsonl"))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    parser.add_argument("--rules", nargs="+", default=["fsdp", "fsdp_tp"], help="rule sets to compile")
    parser.add_argument("--attention", default="xla", choices=("xla", "flash"), help="attention backend")
    parser.add_argument("--reanalyze", action="store_true", help="recount from the saved HLO, then print the table")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the results so far")
    args = parser.parse_args()
    if args.reanalyze:
        reanalyze(args.out)
    if args.table or args.reanalyze:
        print(table(args.out))
        return
    run(args.out, args.models, args.tasks, args.topologies, args.rules, args.attention)


if __name__ == "__main__":
    main()
