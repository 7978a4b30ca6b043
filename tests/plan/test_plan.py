"""`customshift plan`: the real entry points compiled by XLA:TPU for real slices (libtpu, no TPU), tiny shapes.

Checks what a pod user relies on: the train step, the sampler and the prefill compile for v5e:2x2 and for a
two-host v5p slice; the frozen params take per device what the rules lay out; the collectives the rules imply
are in the compiled program (fsdp: weights gathered, gradients reduce-scattered; dp: gradients all-reduced);
--json has the documented keys; every bad input is one line naming the fix.
"""
import json
import math

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu")

from customshift_jax.cli.main import main  # noqa: E402
from customshift_jax.models.mmdit.config import get_preset  # noqa: E402
from customshift_jax.parallel import sharding as shd  # noqa: E402
from customshift_jax.plan.planner import plan  # noqa: E402
from customshift_jax.plan.pod import load_pod, pod_mesh  # noqa: E402
from customshift_jax.plan.tasks import Workload, build  # noqa: E402

TINY = ["--model", "tiny-sd3-medium", "--resolution", "64", "--text-length", "8"]
JSON_KEYS = {"topology", "chips", "hosts", "device_kind", "hbm_bytes_per_chip", "task", "model", "mesh", "rules",
             "global_batch", "resolution", "memory", "flops_per_step", "collectives", "roofline", "compile_seconds"}


@pytest.fixture(scope="module")
def v5e():
    return load_pod("v5e:2x2")


@pytest.fixture(scope="module")
def v5p_two_hosts():
    return load_pod("v5p:2x2x2")


def _work(task, **kw):
    return Workload(get_preset("tiny-sd3-medium"), task, 64, kw.pop("batch", 4), text_length=8, steps=3, **kw)


def test_train_lora_fsdp_gathers_weights_and_reduce_scatters_gradients(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--topology", "v5e:2x2", "--task", "train-lora", *TINY, "--batch", "4",
                 "--mesh", "fsdp=-1", "--rules", "fsdp", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fits" in printed and "roofline" in printed and "compiled in" in printed, printed
    r = json.loads(out.read_text())
    assert JSON_KEYS <= set(r) and {"arguments", "outputs", "temporaries", "total", "fits"} <= set(r["memory"])
    assert {"compute_s", "memory_s", "collective_s", "step_s", "mfu_ceiling"} <= set(r["roofline"])
    assert (r["topology"], r["chips"], r["hosts"], r["device_kind"]) == ("v5e:2x2", 4, 1, "TPU v5 lite")
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "context": 1} and r["memory"]["fits"]
    c = r["collectives"]
    assert c["all-gather"]["count"] > 0 and c["reduce-scatter"]["count"] > 0, c
    assert r["flops_per_step"] > r["xla_flops_per_device"]  # every layer counted, not the scan body once


def test_train_lora_dp_all_reduces_gradients(v5e):
    r = plan(v5e, _work("train-lora"), {"data": -1}, "dp", model_name="tiny")
    c = r["collectives"]
    assert c["all-reduce"]["count"] > 0 and c.get("reduce-scatter", {}).get("count", 0) == 0, c
    assert c.get("all-gather", {}).get("count", 0) == 0, c  # nothing is sharded: no weight to gather


def test_frozen_params_take_what_the_rules_lay_out(v5e):
    """The compiled prefill's parameter layout per device equals `bytes_per_device` of the rules."""
    work = _work("prefill")
    mesh = pod_mesh(v5e, {"fsdp": -1})
    target = build(work, mesh, "fsdp")
    with jax.set_mesh(mesh):
        compiled = target.jitted().lower(*target.args).compile()
    base = target.args[0]

    def by_path(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}

    shardings, leaves = by_path(compiled.input_shardings[0][0]), by_path(base)
    assert set(shardings) == set(leaves)
    compiled_bytes = sum(math.prod(shardings[k].shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                         for k, x in leaves.items())
    ruled = shd.bytes_per_device(base, mesh, "fsdp")
    assert compiled_bytes == ruled and ruled < shd.tree_bytes(base) / 2
    assert compiled.memory_analysis().argument_size_in_bytes >= ruled


@pytest.mark.parametrize("task", ["sample", "prefill", "train-base"])
def test_multi_host_v5p_compiles(v5p_two_hosts, task):
    r = plan(v5p_two_hosts, _work(task, batch=8), {"data": 2, "fsdp": -1}, "fsdp", model_name="tiny")
    assert (r["chips"], r["hosts"], r["devices_per_host"]) == (8, 2, 4)
    assert r["batch"]["per_process"] == 4 and r["batch"]["per_device"] == 1
    assert r["memory"]["fits"] and r["flops_per_step"] > 0
    if task == "sample":  # the 3-step loop is counted 3 times, not once
        assert 3 in r["loops"] and r["flops_per_step"] > 2.5 * plan(
            v5p_two_hosts, _work("sample-step", batch=8), {"data": 2, "fsdp": -1}, "fsdp")["flops_per_step"]


def test_two_slices_put_data_across_dcn():
    pod = load_pod("v5e:2x2", num_slices=2)
    mesh = pod_mesh(pod, {"data": 2, "fsdp": -1})
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
    with pytest.raises(ValueError, match="multiple of 2"):
        pod_mesh(pod, {"data": 1, "fsdp": -1})


def test_a_mesh_axis_smaller_than_a_physical_axis_splits_it():
    """SD3.5-large's 38 heads take tensor=2; on v6e's 8x8 chips that splits a physical axis (jax.make_mesh alone
    refuses it)."""
    pod = load_pod("v6e:8x8")
    mesh = pod_mesh(pod, {"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "tensor": 2, "context": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in pod.devices)


@pytest.mark.parametrize("argv, says", [
    (["--topology", "v9:2x2"], "unknown topology 'v9:2x2'"),
    (["--topology", "v5e-17"], "unknown topology 'v5e-17'; give GEN:AxB[xC]"),
    (["--topology", "v5e:2x2", "--mesh", "fsdp=3"], "make 3 devices, but there are 4"),
    (["--topology", "v5e:2x2", "--resolution", "100"], "multiple of 16"),
    (["--topology", "v5e:2x2", "--model", "nowhere/at/all"], "not a preset"),
])
def test_bad_input_is_one_line(argv, says, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err, err


def test_libtpu_missing_names_the_install(monkeypatch, capsys):
    monkeypatch.setattr("customshift_jax.plan.pod.libtpu_available", lambda: False)
    assert main(["plan", "--topology", "v5e:2x2"]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[tpu]"' in err and err.count("\n") == 1, err


def test_does_not_fit_says_by_how_much_and_which_knob(capsys):
    """SD3.5-large's frozen weights alone (about 30 GiB in fp32, replicated by dp) cannot fit a 16 GiB v5e chip."""
    code = main(["plan", "--topology", "v5e:2x2", "--model", "sd3.5-large", "--task", "prefill", "--batch", "4",
                 "--resolution", "256", "--text-length", "8", "--mesh", "data=-1", "--rules", "dp", "--dtype",
                 "fp32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and "does not fit" in err and "GiB over" in err, err
    assert "--rules fsdp" in err and "--dtype bf16" in err, err


def test_sweep_grid_and_table_mark_the_fastest_that_fits():
    import argparse

    from customshift_jax.cli.plan_cmd import sweep_candidates, sweep_table

    args = argparse.Namespace(sweep=True, task="train-lora", remat="none", attention="flash", mesh="fsdp=-1",
                              rules="fsdp")
    grid = sweep_candidates(args, get_preset("sd3.5-large"), 16, 2)  # 38 heads: tensor 2; two slices: data=2
    assert [(c["rules"], c["remat"]) for c in grid] == [(r, m) for r in ("dp", "fsdp", "fsdp_tp")
                                                        for m in ("none", "full")]
    assert grid[4]["mesh"] == {"data": 2, "fsdp": -1, "tensor": 2} and {c["attention"] for c in grid} == {"flash"}

    def report(rules, step, fits):
        return {"rules": rules, "mesh": {"fsdp": 4}, "remat": "full", "attention": "xla",
                "memory": {"total": 2 ** 30, "fits": fits}, "roofline": {"step_s": step, "mfu_ceiling": 0.5,
                                                                          "items_per_s": 1 / step},
                "ici_bytes_per_device": 0, "dcn_bytes_per_device": 0}

    lines = sweep_table([report("dp", 0.1, False), report("fsdp", 0.3, True), report("fsdp_tp", 0.2, True)])
    marked = [line for line in lines.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "fsdp_tp" in marked[0], lines  # dp is faster but does not fit


def test_model_from_a_checkpoint_or_a_diffusers_folder(tiny_pipeline_dir, tiny_checkpoint_dir):
    from customshift_jax.cli.plan_cmd import model_config
    from customshift_jax.io.loading import load_transformer

    for folder in (tiny_pipeline_dir, tiny_checkpoint_dir):
        config, name = model_config(str(folder))
        assert config == load_transformer(folder)[0] and name == folder.name


def test_two_slices_reduce_gradients_over_dcn():
    pod = load_pod("v5e:2x2", num_slices=2)
    r = plan(pod, _work("train-lora", batch=8), {"data": 2, "fsdp": -1}, "fsdp", model_name="tiny")
    assert (r["chips"], r["hosts"], r["num_slices"]) == (8, 2, 2)
    assert r["dcn_bytes_per_device"] > 0 and r["ici_bytes_per_device"] > 0
    assert r["roofline"]["collective_s"] > r["dcn_bytes_per_device"] / pod.chip.dcn_bytes_per_s * 0.99


def test_flash_attention_reaches_the_plan_as_mosaic_kernels(v5e):
    r = plan(v5e, _work("prefill", attention="flash"), {"fsdp": -1}, "fsdp", keep_hlo=True)
    assert r["attention"] == "flash" and "tpu_custom_call" in r["hlo"] and r["memory"]["fits"]
    plain = plan(v5e, _work("prefill"), {"fsdp": -1}, "fsdp", keep_hlo=True)
    assert "tpu_custom_call" not in plain["hlo"]


def test_best_takes_the_fastest_that_fits_and_breaks_near_ties_by_collective_bytes():
    from customshift_jax.plan.planner import best

    def report(name, step, fits=True, ici=0):
        return {"name": name, "memory": {"fits": fits}, "roofline": {"step_s": step}, "ici_bytes_per_device": ici,
                "dcn_bytes_per_device": 0}

    assert best([report("a", 1.0, fits=False)]) is None
    assert best([report("slow", 2.0), report("fast", 1.0, ici=10 ** 12), report("big", 0.5, fits=False)])[
        "name"] == "fast"
    assert best([report("gathers", 1.0, ici=10 ** 12), report("quiet", 1.01, ici=10 ** 6)])["name"] == "quiet"
