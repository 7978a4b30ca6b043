"""The flash kernels and the models on "flash" compile for TPU through Mosaic on this CPU host (libtpu's
compiler, TPU topology devices, no TPU): forward and backward of both kernels for v4, v5e, v5p and v6e at
ragged lengths, split per sample and head over a (fsdp, tensor) mesh with no gather; the MMDiT forward, the
CustomShift CGB forward and the LoRA training loss on "flash" for one topology, with their memory analysis.
Skipped without libtpu (`pip install "jax[tpu]"`)."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'jax[tpu]' to compile for TPU here")
# other processes on this host may hold libtpu's lockfile; a compile-only client needs no exclusive TPU
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from customshift_jax.customshift.branches import lora_shapes, make_customshift_forward, make_prefill  # noqa: E402
from customshift_jax.kernels import blocks, flash_attention, shifted_flash_attention  # noqa: E402
from customshift_jax.models.mmdit.api import make_forward, param_shapes  # noqa: E402
from customshift_jax.models.mmdit.attention import attention  # noqa: E402
from customshift_jax.models.mmdit.config import get_preset  # noqa: E402
from customshift_jax.models.mmdit.lora import LoRAConfig  # noqa: E402
from customshift_jax.models.mmdit.options import RunOptions  # noqa: E402
from customshift_jax.train.step import make_loss_fn  # noqa: E402

GENERATIONS = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
B, H, D = 2, 2, 64
N_IMG, N_TXT, R = 200, 133, 150  # 333 queries and keys: ragged in every block size; 150 reference keys
MOSAIC = 'custom_call_target="tpu_custom_call"'


@functools.cache
def _mesh(topology: str) -> Mesh:
    """(fsdp 2, tensor 2) over four chips of the topology: batch over fsdp, heads over tensor."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    return Mesh(np.array(devices[:4]).reshape(2, 2), ("fsdp", "tensor"))


def _abstract(mesh, shape, dtype=jnp.bfloat16, spec=P()):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _compile(mesh, fn, *args):
    with jax.set_mesh(mesh):  # no platform= given: the kernels read TPU off the mesh
        return jax.jit(fn).lower(*args).compile()


def _scalar_loss(fn):
    def loss(*args):
        out, lse = fn(*args)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(lse)
    return loss


KERNELS = {
    "flash": (lambda q, k, v: flash_attention(q, k, v), 3),
    "shifted": (lambda q, k, v, kr, vr: shifted_flash_attention(q, k, v, kr, vr, jnp.full((H,), 0.3), N_IMG), 5),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_kernels_compile_forward_and_backward_through_mosaic(generation, kernel):
    mesh = _mesh(GENERATIONS[generation])
    fn, n_args = KERNELS[kernel]
    spec = P("fsdp", None, "tensor")  # (B, N, H, D): samples over fsdp, heads over tensor
    args = [_abstract(mesh, (B, N_IMG + N_TXT, H, D), spec=spec) for _ in range(3)]
    args += [_abstract(mesh, (1, R, H, D)) for _ in range(n_args - 3)]
    loss = _scalar_loss(fn)
    forward = _compile(mesh, loss, *args).as_text()
    backward = _compile(mesh, jax.grad(loss, argnums=tuple(range(n_args))), *args).as_text()
    assert forward.count(MOSAIC) == 1  # one Mosaic kernel, not interpret mode's XLA loops
    assert backward.count(MOSAIC) == (3 if kernel == "flash" else 4)  # forward, dq, dk/dv (base, reference)
    for text in (forward, backward):  # each chip runs its own samples and heads: nothing gathered
        assert "all-gather" not in text and "all-to-all" not in text


def test_flash_needs_no_dense_logits_on_tpu():
    """The compiler's HBM temporaries: xla holds (B, H, N, N) float32 logits, flash a few (B, H, N, D) copies.
    (At 2048 tokens xla's 32 MiB of logits stay in v5e's 128 MiB of VMEM and the HBM figure reads 0.)"""
    mesh = Mesh(np.array(_mesh(GENERATIONS["v5e"]).devices.flat[:1]), ("data",))
    n = 4096
    args = [_abstract(mesh, (1, n, H, D)) for _ in range(3)]
    temp = {b: _compile(mesh, lambda *a, b=b: attention(*a, backend=b), *args).memory_analysis().temp_size_in_bytes
            for b in ("xla", "flash")}
    logits = H * n * n * 4
    assert temp["xla"] >= logits > 64 * temp["flash"], temp


def test_a_2048_px_sequence_fits_v4_vmem():
    """16384 image + 333 text tokens: each (sample, head)'s whole K/V (or Q, dO) sits in VMEM single-buffered,
    within TPU v4's 16 MiB (double-buffered it needs 19.4 MiB and the compile fails)."""
    mesh = Mesh(np.array(_mesh(GENERATIONS["v4"]).devices.flat[:1]), ("data",))
    args = [_abstract(mesh, (1, 16384 + 333, 1, D)) for _ in range(3)]
    loss = _scalar_loss(KERNELS["flash"][0])
    assert _compile(mesh, jax.grad(loss, argnums=(0, 1, 2)), *args).as_text().count(MOSAIC) == 3


def test_tpu_blocks_follow_the_lengths():
    assert blocks.choose_block_sizes(4429, 4429, 64, "tpu", nr=1032) == (512, 256)
    assert blocks.choose_block_sizes(333, 333, 64, "tpu") == (128, 128)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        blocks.check_supported("tpu", False, 64, 128, 128, jnp.float16)


# --- the models on "flash", one topology ---------------------------------------------------------------------

CONFIG = get_preset("tiny-sd3-medium")
LORA = LoRAConfig(rank=4, alpha=8.0)
LATENT, TEXT = 16, 7  # 64 image tokens, 7 text tokens


def _model_inputs(mesh):
    params = jax.tree.map(lambda s: _abstract(mesh, s.shape, s.dtype), param_shapes(CONFIG))
    batch = P("fsdp")
    inputs = (_abstract(mesh, (B, 16, LATENT, LATENT), jnp.float32, batch), _abstract(mesh, (B,), jnp.float32, batch),
              _abstract(mesh, (B, TEXT, CONFIG.joint_attention_dim), jnp.float32, batch),
              _abstract(mesh, (B, CONFIG.pooled_projection_dim), jnp.float32, batch),
              _abstract(mesh, (CONFIG.num_layers,), bool))
    return params, inputs


def _nbytes(tree) -> int:
    """Bytes per chip of abstract arrays (each chip holds its shard)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _check_memory(compiled, args, mib: float):
    """The compiler's per-chip arguments are the shards given; outputs and temporaries small at these shapes."""
    m = compiled.memory_analysis()
    assert m.argument_size_in_bytes >= _nbytes(args)  # TPU layouts pad small minor dims, never shrink
    assert 0 <= m.temp_size_in_bytes < mib * 2 ** 20 and 0 < m.output_size_in_bytes < mib * 2 ** 20


def test_mmdit_forward_on_flash_compiles():
    mesh = _mesh(GENERATIONS["v5e"])
    params, inputs = _model_inputs(mesh)
    compiled = _compile(mesh, make_forward(CONFIG, RunOptions(dtype=jnp.bfloat16, backend="flash")), params, *inputs)
    assert MOSAIC in compiled.as_text()
    _check_memory(compiled, (params, inputs), 16)


@pytest.mark.parametrize("form", ["single", "two_pass"])
def test_customshift_cgb_forward_on_flash_compiles(form):
    mesh = _mesh(GENERATIONS["v5e"])
    params, inputs = _model_inputs(mesh)
    cgb = jax.tree.map(lambda s: _abstract(mesh, s.shape, s.dtype), lora_shapes(CONFIG, LORA, "cgb"))
    rab = jax.tree.map(lambda s: _abstract(mesh, s.shape, s.dtype), lora_shapes(CONFIG, LORA, "rab"))
    ref = (_abstract(mesh, (1, 16, LATENT, LATENT), jnp.float32), _abstract(mesh, (1, 5, CONFIG.joint_attention_dim),
           jnp.float32), _abstract(mesh, (1, CONFIG.pooled_projection_dim), jnp.float32))
    with jax.set_mesh(mesh):
        options = RunOptions(dtype=jnp.bfloat16, backend="flash")
        kv = jax.eval_shape(make_prefill(CONFIG, LORA, options), params, rab, *ref)
    kv = jax.tree.map(lambda s: _abstract(mesh, s.shape, s.dtype), kv)
    gamma = _abstract(mesh, (B,), jnp.float32, P("fsdp"))
    forward = make_customshift_forward(CONFIG, LORA, RunOptions(dtype=jnp.bfloat16, backend="flash"), form=form)
    compiled = _compile(mesh, forward, params, cgb, *inputs, kv, gamma)
    assert compiled.as_text().count(MOSAIC) >= (1 if form == "single" else 2)
    _check_memory(compiled, (params, cgb, inputs, kv), 16)


def test_lora_training_loss_on_flash_differentiates_for_tpu():
    """`make_loss_fn` on backend "flash": the gradient of the RAB prefill + CGB loss compiles (Mosaic backward)."""
    mesh = _mesh(GENERATIONS["v5e"])
    params, _ = _model_inputs(mesh)
    trainable = {br: jax.tree.map(lambda s: _abstract(mesh, s.shape, s.dtype), lora_shapes(CONFIG, LORA, br))
                 for br in ("rab", "cgb")}
    batch = {name: _abstract(mesh, (B,) + shape, jnp.float32, P("fsdp")) for name, shape in {
        "latents": (16, LATENT, LATENT), "ref_latents": (16, LATENT, LATENT),
        "prompt_embeds": (TEXT, CONFIG.joint_attention_dim), "pooled": (CONFIG.pooled_projection_dim,),
        "subject_embeds": (5, CONFIG.joint_attention_dim), "subject_pooled": (CONFIG.pooled_projection_dim,)}.items()}
    key = jax.random.key(0)
    loss = make_loss_fn(CONFIG, LORA, RunOptions(dtype=jnp.bfloat16, backend="flash"))
    grad = jax.grad(lambda tr, p, bt: loss(tr, p, bt, key)[0])
    compiled = _compile(mesh, grad, trainable, params, batch)
    assert compiled.as_text().count(MOSAIC) >= 3  # forward and backward kernels
    _check_memory(compiled, (trainable, params, batch), 32)
