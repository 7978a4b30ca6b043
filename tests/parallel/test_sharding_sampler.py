"""The sharded samplers equal the unsharded ones (DESIGN section 5, rel err <= 1e-5): the SD3 sampler with CFG
and skip-layer guidance, and the CustomShift sampler reading a one-sample reference cache, on every mesh."""
import jax
import numpy as np
import pytest

from customshift_jax.customshift.branches import init_lora, prefill
from customshift_jax.customshift.sampling import make_customshift_sampler
from customshift_jax.models.mmdit.api import init_mmdit
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.numerics import relative_error
from customshift_jax.parallel import sharding as sh
from customshift_jax.sampling import (
    Conditioning,
    make_sampler,
    make_schedule,
    skip_layer_guidance,
)

TOL = 1e-5
# As tests/parallel/test_sharding_train.py: dual attention, qk norm, the context_pre_only last block; width 32.
CONFIG = MMDiTConfig(num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm", sample_size=8, attention_head_dim=8,
                     num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                     pooled_projection_dim=24, pos_embed_max_size=16)
LORA = LoRAConfig(rank=4, alpha=8.0)
MESHES = {
    "dp8": (dict(data=8), "dp"),
    "fsdp8": (dict(fsdp=8), "fsdp"),
    "fsdp4_tp2": (dict(fsdp=4, tensor=2), "fsdp_tp"),
    "dp2_fsdp2_tp2": (dict(data=2, fsdp=2, tensor=2), "fsdp_tp"),
    "context2_fsdp4": (dict(context=2, fsdp=4), "context"),
}
STEPS, GUIDANCE, GAMMA = 3, 4.0, 1.3


def _random(tree, key, scale=0.05):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in
                              zip(jax.random.split(key, len(leaves)), leaves)])


@pytest.fixture(scope="module")
def setup():
    params = jax.jit(lambda k: init_mmdit(CONFIG, k))(jax.random.key(0))
    rab = _random(init_lora(CONFIG, LORA, jax.random.key(1), branch="rab"), jax.random.key(2))
    cgb = _random(init_lora(CONFIG, LORA, jax.random.key(3), branch="cgb"), jax.random.key(4))
    rng = np.random.default_rng(0)
    b, j, p = 8, CONFIG.joint_attention_dim, CONFIG.pooled_projection_dim
    cond = Conditioning(*(rng.standard_normal(s).astype(np.float32) for s in [(b, 6, j), (b, p), (b, 6, j), (b, p)]))
    ref = (rng.standard_normal((1, 16, 8, 12)).astype(np.float32), rng.standard_normal((1, 6, j)).astype(np.float32),
           rng.standard_normal((1, p)).astype(np.float32))
    latents = rng.standard_normal((b, 16, 8, 12)).astype(np.float32)  # non-square: 4 x 6 patches
    schedule = make_schedule({"shift": 3.0}, STEPS)
    slg = skip_layer_guidance(CONFIG, [0], STEPS, start=0.0, stop=1.0)  # the third pass on steps 1 and 2
    kv = prefill(CONFIG, params, *ref, rab_lora=rab, lora_config=LORA).kv
    base = make_sampler(CONFIG)(params, latents, cond, schedule, guidance_scale=GUIDANCE, slg=slg)
    shifted = make_customshift_sampler(CONFIG, LORA)({"base": params, "cgb": cgb}, latents, cond, schedule,
                                                     guidance_scale=GUIDANCE, extra={"ref_kv": kv, "gamma": GAMMA})
    return dict(params=params, cgb=cgb, cond=cond, latents=latents, schedule=schedule, slg=slg, kv=kv, base=base,
                shifted=shifted)


def _meshes(*default):
    """All mesh ids; those not in `default` are marked slow (tests/parallel/test_sharding.py runs the forward on each)."""
    return [m if m in default else pytest.param(m, marks=pytest.mark.slow) for m in MESHES]


def _batch_axes(mesh_id):
    return {"dp8": "data", "dp2_fsdp2_tp2": ("fsdp", "data")}.get(mesh_id, "fsdp")


@pytest.mark.parametrize("mesh_id", _meshes("fsdp8", "fsdp4_tp2", "dp2_fsdp2_tp2"))
def test_sharded_customshift_sampler_equals_unsharded(setup, mesh_id):
    sizes, rules = MESHES[mesh_id]
    s = setup
    mesh = sh.make_mesh(**sizes)
    params = sh.shard_params(s["params"], mesh, rules)
    run = make_customshift_sampler(CONFIG, LORA, mesh=mesh, rules=rules)
    shifted = run({"base": params, "cgb": s["cgb"]}, s["latents"], s["cond"], s["schedule"],
                  guidance_scale=GUIDANCE, extra={"ref_kv": s["kv"], "gamma": GAMMA})
    error = relative_error(shifted, s["shifted"])
    print(mesh_id, f"customshift sampler {error:.1e}")
    assert error <= TOL, (mesh_id, error)
    assert relative_error(s["shifted"], s["base"]) > 1e-3  # the reference and the LoRA matter
    assert shifted.sharding.spec[0] == _batch_axes(mesh_id)
    # Params go in laid out by path, the nested {"base", "cgb"} tree too; the cache's one sample stays whole.
    in_shardings, _ = run.sharded[True].shardings(
        {"base": s["params"], "cgb": s["cgb"]}, s["latents"], s["cond"], s["schedule"], np.float32(GUIDANCE),
        None, {"ref_kv": s["kv"], "gamma": GAMMA}, None)
    kernel = in_shardings[0]["base"]["transformer_blocks"]["0:1"]["scan"]["attn"]["to_q"]["kernel"]
    assert kernel.spec == params["transformer_blocks"]["0:1"]["scan"]["attn"]["to_q"]["kernel"].sharding.spec
    k_spec = jax.tree_util.tree_leaves(in_shardings[6]["ref_kv"])[0].spec  # (layers, batch 1, length, heads, -)
    assert len(k_spec) < 2 or k_spec[1] is None


@pytest.mark.parametrize("mesh_id", _meshes("context2_fsdp4"))
def test_sharded_sd3_sampler_with_slg_equals_unsharded(setup, mesh_id):
    sizes, rules = MESHES[mesh_id]
    s = setup
    mesh = sh.make_mesh(**sizes)
    base = make_sampler(CONFIG, mesh=mesh, rules=rules)(sh.shard_params(s["params"], mesh, rules), s["latents"],
                                                        s["cond"], s["schedule"], guidance_scale=GUIDANCE,
                                                        slg=s["slg"])
    error = relative_error(base, s["base"])
    print(mesh_id, f"sd3 sampler {error:.1e}")
    assert error <= TOL, (mesh_id, error)
    assert base.sharding.spec[0] == _batch_axes(mesh_id)
