"""The flash backend where training and pods use it, on CPU (Pallas interpret mode, fp32): the LoRA and base
training losses differentiate on "flash" to the "xla" gradients; on a mesh of several devices the kernels run
per sample and head (shard_map) and give the unsharded result; the TPU code path (blocks of 128, rows written
through a transpose) gives the xla result."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from customshift_jax.customshift.branches import init_lora
from customshift_jax.customshift.cads import single_form_bias
from customshift_jax.kernels import blocks, flash_attention, partition, shifted_flash_attention
from customshift_jax.models.mmdit.api import init_mmdit
from customshift_jax.models.mmdit.attention import attention
from customshift_jax.models.mmdit.config import get_preset
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.train.base_step import make_base_loss_fn
from customshift_jax.train.step import make_loss_fn

CONFIG = dataclasses.replace(get_preset("tiny-sd3-medium"), num_layers=1)
LORA = LoRAConfig(rank=2, alpha=2.0)
TOL = 1e-5


def _assert_close(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.shape == b.shape and rel_err(a, b) <= TOL, (a.shape, rel_err(a, b))


def _batch(b=2, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {"latents": f(b, 16, 8, 8), "ref_latents": f(b, 16, 8, 8), "prompt_embeds": f(b, 6, 32),
            "pooled": f(b, 24), "subject_embeds": f(b, 6, 32), "subject_pooled": f(b, 24)}


def test_lora_loss_gradients_on_flash_equal_xla():
    """`make_loss_fn` with `RunOptions.backend`: RAB prefill and CGB forward (the two-pass shift) on the flash kernels."""
    base = init_mmdit(CONFIG, jax.random.key(0))
    trainable = {br: jax.tree.map(lambda x: x + 0.05, init_lora(CONFIG, LORA, jax.random.key(i), branch=br))
                 for i, br in enumerate(("rab", "cgb"))}  # non-zero B and beta: every factor gets a gradient
    grads = {b: jax.jit(jax.grad(make_loss_fn(CONFIG, LORA, RunOptions(backend=b), ref_dropout=0.0), has_aux=True))(
        trainable, base, _batch(), jax.random.key(1)) for b in ("flash", "xla")}
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["xla"][0]["rab"])) > 0
    _assert_close(grads["flash"], grads["xla"])


def test_base_loss_gradients_on_flash_equal_xla():
    params = init_mmdit(CONFIG, jax.random.key(0))
    grads = {b: jax.jit(jax.grad(make_base_loss_fn(CONFIG, RunOptions(backend=b)), has_aux=True))(
        params, {}, _batch(), jax.random.key(1)) for b in ("flash", "xla")}
    _assert_close(grads["flash"], grads["xla"])


# --- the kernels on a mesh and on the TPU code path ----------------------------------------------------------

B, N_IMG, N_TXT, R, H, D = 4, 200, 100, 150, 2, 8


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    n = N_IMG + N_TXT
    return f(B, n, H, D), f(B, n, H, D), f(B, n, H, D), f(1, R, H, D), f(1, R, H, D), f(B, H)


def _grads_of(fn):
    def loss(*args):
        out, lse = fn(*args)
        return jnp.sum(jnp.sin(out) * out) + jnp.sum(jnp.sin(lse) * lse), (out, lse)
    return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))


def _xla_single(q, k, v, k_ref, v_ref, lam):
    k_ref, v_ref = (jnp.broadcast_to(x, (B,) + x.shape[1:]) for x in (k_ref, v_ref))
    bias = single_form_bias(lam, N_IMG, q.shape[1], k.shape[1], R)
    return attention(q, jnp.concatenate([k, k_ref], 1), jnp.concatenate([v, v_ref], 1), bias=bias, return_lse=True)


def test_kernels_on_a_mesh_run_per_sample_and_head_and_equal_the_unsharded():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
    assert partition.layout({"fsdp": 2, "tensor": 2}, B, H) == (("fsdp",), ("tensor",))
    assert partition.layout({"data": 2, "fsdp": 4, "tensor": 2}, 2, 24) == (("data",), ("tensor", "fsdp"))
    fused = _grads_of(lambda *a: shifted_flash_attention(*a, N_IMG, block_sizes=blocks.BlockSizes(64, 64)))
    args = _arrays()
    want = fused(*args)
    spec = P("fsdp", None, "tensor")
    sharded = [jax.device_put(x, NamedSharding(mesh, spec if x.shape[0] == B and x.ndim == 4 else P()))
               for x in args]
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(fused)(*sharded))
        got = fused(*sharded)
    assert "shard_map" in jaxpr
    _assert_close(got, want)


def test_a_given_layout_moves_nothing_at_the_kernel():
    """q laid out with the batch over ("fsdp", "data"): the default layout ("data", "fsdp") costs collective
    permutes around the kernel; a given layout (`RunOptions.kernel_layout`) with the rules' order costs none."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    q = jax.ShapeDtypeStruct((B, 64, H, D), jnp.float32, sharding=NamedSharding(mesh, P(("fsdp", "data"))))

    def permutes(layout=None):
        fn = jax.jit(lambda *a: flash_attention(*a, layout=layout)[0],
                     out_shardings=NamedSharding(mesh, P(("fsdp", "data"))))
        with jax.set_mesh(mesh):
            return fn.lower(q, q, q).compile().as_text().count("collective-permute")

    assert permutes() > 0
    assert permutes((("fsdp", "data"), ())) == 0


def test_kernels_inside_a_shard_map_split_the_axes_left():
    """Called inside a shard_map over "data", the kernels split the rest of the mesh ("tensor") themselves."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    fused = jax.jit(lambda *a: shifted_flash_attention(*a, N_IMG, block_sizes=blocks.BlockSizes(64, 64)))
    args = _arrays(2)
    per_data = jax.shard_map(fused, mesh=mesh, in_specs=(P("data"),) * 3 + (P(),) * 2 + (P("data"),),
                             out_specs=P("data"), axis_names={"data"}, check_vma=False)
    with jax.set_mesh(mesh):
        got = jax.jit(per_data)(*args)
        assert str(jax.make_jaxpr(per_data)(*args)).count("shard_map") == 2  # the outer one and the kernel's
    _assert_close(got, fused(*args))


def test_tpu_code_path_in_interpret_mode_equals_xla():
    """platform="tpu" with interpret=True: TPU block sizes (128) and the per-query rows written through the
    (bq, 128) transpose that TPU v4 needs, checked on CPU against the xla backend."""
    assert blocks.choose_block_sizes(N_IMG + N_TXT, N_IMG + N_TXT, D, "tpu", nr=R) == (128, 128)
    fused = _grads_of(lambda *a: shifted_flash_attention(*a, N_IMG, platform="tpu", interpret=True))
    args = _arrays(1)
    _assert_close(fused(*args), _grads_of(_xla_single)(*args))


def test_the_platform_comes_from_the_mesh():
    assert blocks.target_platform("tpu") == "tpu"
    assert blocks.target_platform() == "cpu"
    with jax.set_mesh(Mesh(np.array(jax.devices()[:2]), ("data",))):
        assert blocks.target_platform() == "cpu"
    with pytest.raises(ValueError, match="no compiled CPU lowering"):
        blocks.resolve_interpret(False, blocks.target_platform())
