"""Sharding (DESIGN section 5) on 8 CPU devices: every mesh gives the unsharded results; memory from the compiler."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from customshift_jax.customshift.branches import (
    CUSTOMSHIFT_FORWARD_AXES,
    PREFILL_AXES,
    init_lora,
    make_customshift_forward,
    make_prefill,
)
from customshift_jax.models.mmdit.api import init_mmdit, make_forward
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.numerics import relative_error
from customshift_jax.parallel import sharding as sh

TOL = 1e-5
# Width 32 = 4 heads x 8 divides every mesh axis used below; batch 8 divides dp=8.
CONFIG = MMDiTConfig(num_layers=2, qk_norm="rms_norm", sample_size=8, attention_head_dim=8, num_attention_heads=4,
                     caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=24, pos_embed_max_size=16)
LORA = LoRAConfig(rank=4, alpha=8.0)
MESHES = {  # id: (mesh sizes, rule set)
    "dp8": (dict(data=8), "dp"),
    "fsdp8": (dict(fsdp=8), "fsdp"),
    "fsdp4_tp2": (dict(fsdp=4, tensor=2), "fsdp_tp"),
    "dp2_fsdp2_tp2": (dict(data=2, fsdp=2, tensor=2), "fsdp_tp"),
    "context2_fsdp4": (dict(context=2, fsdp=4), "context"),
}


def randomize(tree, key, scale):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def setup():
    params = jax.jit(lambda k: init_mmdit(CONFIG, k))(jax.random.key(0))
    rab = randomize(init_lora(CONFIG, LORA, jax.random.key(1), branch="rab"), jax.random.key(2), 0.05)
    cgb = randomize(init_lora(CONFIG, LORA, jax.random.key(3), branch="cgb"), jax.random.key(4), 0.05)
    rng = np.random.default_rng(0)
    b = 8
    inputs = (rng.standard_normal((b, 16, 8, 8)).astype(np.float32), np.linspace(0, 950, b).astype(np.float32),
              rng.standard_normal((b, 8, CONFIG.joint_attention_dim)).astype(np.float32),
              rng.standard_normal((b, CONFIG.pooled_projection_dim)).astype(np.float32))
    skip = np.zeros((CONFIG.num_layers,), bool)
    # One reference per sample; R + S = 16 + 8 tokens.
    ref = (rng.standard_normal((b, 16, 8, 8)).astype(np.float32),
           rng.standard_normal((b, 8, CONFIG.joint_attention_dim)).astype(np.float32),
           rng.standard_normal((b, CONFIG.pooled_projection_dim)).astype(np.float32))
    base = jax.jit(make_forward(CONFIG))(params, *inputs, skip)
    kv = jax.jit(make_prefill(CONFIG, LORA))(params, rab, *ref)
    shifted = jax.jit(make_customshift_forward(CONFIG, LORA))(params, cgb, *inputs, skip, kv, 0.7)
    return dict(params=params, rab=rab, cgb=cgb, inputs=inputs, skip=skip, ref=ref, base=base, kv=kv,
                shifted=shifted)


@pytest.fixture(scope="module")
def sharded_forward():
    """The sharded MMDiT forward per mesh id, made once: its compiled executable is cached inside."""
    made = {}

    def get(mesh_id):
        if mesh_id not in made:
            sizes, rules = MESHES[mesh_id]
            mesh = sh.make_mesh(**sizes)
            forward = make_forward(CONFIG, sh.on_mesh(RunOptions(), mesh, rules))
            made[mesh_id] = sh.ShardedFunction(forward, mesh, rules, *sh.FORWARD_AXES)
        return made[mesh_id]

    return get


@pytest.mark.parametrize("mesh_id", list(MESHES))
def test_sharded_equals_unsharded(setup, sharded_forward, mesh_id):
    sizes, rules = MESHES[mesh_id]
    s = setup
    forward = sharded_forward(mesh_id)
    mesh = forward.mesh
    options = sh.on_mesh(RunOptions(), mesh, rules)
    prefill = sh.ShardedFunction(make_prefill(CONFIG, LORA, options), mesh, rules, *PREFILL_AXES)
    cgb_forward = sh.ShardedFunction(make_customshift_forward(CONFIG, LORA, options), mesh, rules,
                                     *CUSTOMSHIFT_FORWARD_AXES)
    params = sh.shard_params(s["params"], mesh, rules)

    base = forward(params, *s["inputs"], s["skip"])
    kv = prefill(params, s["rab"], *s["ref"])
    shifted = cgb_forward(params, s["cgb"], *s["inputs"], s["skip"], kv, 0.7)

    errors = {"forward": relative_error(base, s["base"]), "shifted": relative_error(shifted, s["shifted"]),
              "kv": max(relative_error(a, b) for a, b in zip(jax.tree_util.tree_leaves(kv),
                                                             jax.tree_util.tree_leaves(s["kv"])))}
    print(mesh_id, {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= TOL for e in errors.values()), (mesh_id, errors)
    assert shifted.sharding.mesh.shape == mesh.shape
    # The layouts the rules promise are the ones the outputs and the cache have.
    batch_axes = {"dp8": "data", "fsdp8": "fsdp", "fsdp4_tp2": "fsdp", "dp2_fsdp2_tp2": ("fsdp", "data"),
                  "context2_fsdp4": "fsdp"}[mesh_id]
    assert shifted.sharding.spec[0] == batch_axes
    k_cache = next(iter(kv.values()))[0]
    assert k_cache.sharding.spec[1] == batch_axes
    if mesh_id == "context2_fsdp4":
        assert k_cache.sharding.spec[2] == "context"  # the cache is split along tokens
    if "tp2" in mesh_id:
        assert k_cache.sharding.spec[3] == "tensor"  # and along heads


def _input_bytes_per_device(shardings, args) -> int:
    total = 0
    for s, x in zip(jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(args)):
        total += math.prod(s.shard_shape(np.shape(x))) * np.dtype(x.dtype).itemsize
    return total


def test_fsdp_memory_from_the_compiler(setup, sharded_forward):
    s = setup
    forward = sharded_forward("fsdp8")  # compiled already if the parity test ran
    args = (s["params"], *s["inputs"], s["skip"])
    stats = forward.compile(*args).memory_analysis()
    in_shardings, _ = forward.shardings(*args)
    data_bytes = _input_bytes_per_device(in_shardings[1:], args[1:])
    param_bytes_compiler = stats.argument_size_in_bytes - data_bytes
    full = sh.tree_bytes(s["params"])
    param_bytes_layout = _input_bytes_per_device(in_shardings[0], s["params"])
    print(f"fsdp=8: params {full:,} B unsharded, {param_bytes_compiler:,} B per device from the compiler "
          f"(layout sum {param_bytes_layout:,}; bound {full / 8 * 1.05:,.0f})")
    assert param_bytes_layout == sh.bytes_per_device(s["params"], forward.mesh, "fsdp")
    # The compiler drops params the forward never reads (the last block's text-query projection), else equal.
    assert 0.97 * param_bytes_layout <= param_bytes_compiler <= param_bytes_layout
    assert param_bytes_compiler <= full / 8 * 1.05


def test_tensor_parallel_halves_attention_and_mlp_kernels(setup):
    mesh = sh.make_mesh(data=4, tensor=2)
    params = sh.shard_params(setup["params"], mesh, "tp")
    group = params["transformer_blocks"]["0:1"]["scan"]
    halved = {
        "to_q": (group["attn"]["to_q"]["kernel"], 2), "to_k": (group["attn"]["to_k"]["kernel"], 2),
        "add_v_proj": (group["attn"]["add_v_proj"]["kernel"], 2), "to_out": (group["attn"]["to_out"]["0"]["kernel"], 1),
        "ff.0": (group["ff"]["net"]["0"]["proj"]["kernel"], 2), "ff.2": (group["ff"]["net"]["2"]["kernel"], 1),
        "ff_context.0": (group["ff_context"]["net"]["0"]["proj"]["kernel"], 2),
    }
    for name, (kernel, axis) in halved.items():
        local = kernel.addressable_shards[0].data.shape
        expected = list(kernel.shape)
        expected[axis] //= 2
        assert local == tuple(expected), (name, kernel.shape, local)
        assert kernel.addressable_shards[0].data.nbytes * 2 == kernel.nbytes
    # Whatever has no heads / mlp axis stays whole under tp.
    assert params["context_embedder"]["kernel"].addressable_shards[0].data.shape == \
        params["context_embedder"]["kernel"].shape


def test_logical_axes_by_path():
    la = sh.logical_axes
    assert la("transformer_blocks/0:2/scan/attn/to_q/kernel", (2, 32, 32)) == ("layers", "embed", "heads")
    assert la("transformer_blocks/0:2/scan/attn/to_out/0/kernel", (2, 32, 32)) == ("layers", "heads", "embed")
    assert la("transformer_blocks/0:2/scan/ff/net/0/proj/kernel", (2, 32, 128)) == ("layers", "embed", "mlp")
    assert la("transformer_blocks/0:2/scan/ff_context/net/2/bias", (2, 32)) == ("layers", "embed")
    assert la("transformer_blocks/0:2/scan/norm1/linear/kernel", (2, 32, 192)) == ("layers", "embed", "mlp")
    assert la("transformer_blocks/0:2/scan/attn/to_v/lora_A", (2, 32, 4)) == ("layers", "embed", "lora")
    assert la("transformer_blocks/0:2/scan/attn/to_v/lora_B", (2, 4, 32)) == ("layers", "lora", "heads")
    assert la("transformer_blocks/0:2/scan/attn/beta", (2, 4)) == ("layers", "heads")
    assert la("pos_embed/proj/kernel", (2, 2, 16, 32)) == (None, None, None, "embed")
    assert la("context_embedder/kernel", (4096, 32)) == (None, "embed")
    assert la("something/new", (3, 3)) == (None, None)
    # Keys before transformer_blocks are ignored: nested trees (sampler params, a train state's Adam moments).
    assert la("base/transformer_blocks/0:2/scan/attn/to_q/kernel", (2, 32, 32)) == ("layers", "embed", "heads")
    assert la(("opt_state", "1", "0", "mu", "cgb", "transformer_blocks", "0:2", "scan", "attn", "to_out", "0",
               "lora_B"), (2, 4, 32)) == ("layers", "lora", "embed")


def test_rules_replicate_what_does_not_divide_and_say_so():
    mesh = {"data": 1, "fsdp": 16, "tensor": 1, "context": 1}
    layout = sh.resolve(("layers", "heads"), (38, 38), mesh, "fsdp")  # sd3.5-large beta: 38 heads
    assert layout.spec == PartitionSpec() and layout.shard_shape == (38, 38)
    assert "replicated" in layout.notes[0] and "38" in layout.notes[0]
    # A mesh axis is used once per array: batch takes fsdp, so the activation's embed stays whole ...
    mesh8 = {"fsdp": 8}
    assert sh.resolve(("batch", "length", "embed"), (8, 16, 32), mesh8, "fsdp").spec == PartitionSpec("fsdp")
    # ... unless the batch does not divide: then the next dim that can take fsdp does.
    spec = sh.resolve(("batch", "length", "embed"), (1, 16, 32), mesh8, "fsdp").spec
    assert spec == PartitionSpec(None, None, "fsdp")
    # Extending a rule set is data, not a model edit.
    rules = sh.extend_rules("fsdp", ("length", "fsdp"))
    assert sh.resolve(("batch", "length", "embed"), (1, 16, 32), mesh8, rules).spec == PartitionSpec(None, "fsdp")
    table = sh.layout_table({"attn": {"beta": np.zeros((38,), np.float32)}}, mesh, "fsdp")
    assert "replicated" in table


def test_mesh_errors_name_sizes_and_device_count():
    with pytest.raises(ValueError, match=r"make 6 devices, but there are 8"):
        sh.make_mesh(fsdp=3, tensor=2)
    with pytest.raises(ValueError, match=r"do not divide the 8 devices") as e:
        sh.make_mesh(fsdp=-1, tensor=3)
    assert "xla_force_host_platform_device_count" in str(e.value)  # the hint in every mesh error
    assert dict(sh.make_mesh(fsdp=-1, tensor=2).shape) == {"data": 1, "fsdp": 4, "tensor": 2, "context": 1}
    with pytest.raises(ValueError, match="unknown rule set"):
        sh.as_rules("zero3")
    assert sh.parse_mesh("data=2, fsdp=-1") == {"data": 2, "fsdp": -1}
    for bad, message in (("batch=2", "not a mesh axis"), ("data=2,data=4", "repeats"), ("fsdp=two", "integer"),
                         ("", "NAME=SIZE pairs")):
        with pytest.raises(ValueError, match=message):
            sh.parse_mesh(bad)
