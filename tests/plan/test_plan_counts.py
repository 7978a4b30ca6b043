"""What a plan counts, checked where the answer is known: matmul FLOPs of every layer against the analytic count
(scanned groups included), and the HLO walk's collectives of a scanned program compiled for two TPU slices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from customshift_jax.customshift.branches import make_customshift_forward
from customshift_jax.models.mmdit.api import make_forward, param_shapes
from customshift_jax.models.mmdit.config import get_preset
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.plan import hlo
from customshift_jax.plan.flops import count_flops, mmdit_forward_flops
from customshift_jax.plan.tasks import Workload, lora_shapes, ref_kv_shapes

PRESETS = ("tiny-sd3-medium", "tiny-sd3.5-medium", "tiny-sd3.5-large")


def _inputs(config, b=2, h=8, w=12, m=7):
    sds = jax.ShapeDtypeStruct
    return (sds((b, config.in_channels, h, w), jnp.float32), sds((b,), jnp.float32),
            sds((b, m, config.joint_attention_dim), jnp.float32), sds((b, config.pooled_projection_dim), jnp.float32),
            sds((config.num_layers,), jnp.bool_))


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_flops_every_layer_equal_the_analytic_count(preset):
    """Dual-attention run, plain run, context_pre_only last block, non-square latents, batch 2: exact."""
    config = get_preset(preset)
    got = count_flops(make_forward(config), param_shapes(config), *_inputs(config))
    assert got == mmdit_forward_flops(config, 2, 8 * 12 // 4, 7)
    # XLA's own count sees a scanned group once: fewer FLOPs than the layers run.
    assert config.num_layers > len(config.block_groups())


def test_customshift_forward_flops_add_the_reference_attention():
    config = get_preset("tiny-sd3.5-medium")
    lora = LoRAConfig(rank=4, alpha=4.0)
    w = Workload(config, "sample-step", 64, 2, text_length=3)
    fn = make_customshift_forward(config, lora)
    ref = ref_kv_shapes(config, w, 1, jnp.float32)  # R + S = 64 + 80 tokens of one reference
    got = count_flops(fn, param_shapes(config), lora_shapes(config, lora, "cgb"), *_inputs(config), ref, 1.0)
    r = w.image_tokens + w.text_tokens
    base = mmdit_forward_flops(config, 2, 8 * 12 // 4, 7, reference_tokens=r)
    assert got > base  # the LoRA matmuls come on top: a rank-4 pair per linear
    plain = count_flops(make_customshift_forward(config, lora), param_shapes(config),
                        lora_shapes(config, lora, "cgb"), *_inputs(config), None, 1.0)
    assert got - plain == 4 * 2 * (8 * 12 // 4) * r * config.inner_dim * config.num_layers


def test_hlo_walk_of_a_scanned_fsdp_step_on_two_slices():
    """6 scanned layers, weights split 4 ways inside a slice, batch over 2 slices: forward and backward gather
    every layer's weight (12 all-gathers), the gradients are reduce-scattered in the slice (6) and all-reduced
    across slices over DCN (6)."""
    pytest.importorskip("libtpu")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from customshift_jax.plan.pod import load_pod

    devices = load_pod("v5e:2x2", num_slices=2).devices
    mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "fsdp"))

    def loss(w, x):
        return jnp.sum(jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0])

    w = jax.ShapeDtypeStruct((6, 256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp")))
    x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    compiled = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, P(None, "fsdp"))).lower(w, x).compile()
    stats = hlo.analyze(compiled.as_text())
    c = stats.collectives()
    layer = 256 * 256 * 2
    assert c["all-gather"]["count"] == 12 and c["all-gather"]["bytes"] == 12 * layer * 3 / 4
    assert c["reduce-scatter"]["count"] == 6 and c["reduce-scatter"]["bytes"] == 6 * layer * 3 / 4
    assert c["all-reduce"]["dcn_bytes"] == 6 * layer / 4 and c["all-reduce"]["ici_bytes"] == 0
    assert sum(n for _, n in stats.loops) == 6 + 5  # the backward loop's first iteration is peeled


def test_hlo_parse_shapes_and_trip_count():
    text = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %c = s32[] constant(9)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %ar = f32[4]{0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %ar)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %z = s32[] constant(2)
  %t = (s32[], f32[4]{0}) tuple(%z, %a)
  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body
  ROOT %r = f32[4]{0} get-tuple-element(%w), index=1
}
"""
    stats = hlo.analyze(text)
    assert stats.loops == [("w", 7)]  # i from 2 while i < 9
    assert stats.collectives()["all-reduce"] == {"count": 7, "bytes": 7 * 2 * 16 * 3 / 4, "async_count": 0,
                                                 "ici_bytes": 7 * 2 * 16 * 3 / 4, "dcn_bytes": 0}
    ag = hlo.parse_instruction("  %ag = bf16[4,8]{1,0} all-gather(%x), channel_id=3, replica_groups=mesh['axis_0'=4,"
                                "'axis_1'=2] {'axis_0'}, dimensions={0}")
    assert hlo.group_size(ag, 1) == 4
    assert hlo.parse_shape("(bf16[2,3]{1,0:T(8,128)(2,1)S(1)}, s32[])")[0] == hlo.Array("bf16", (2, 3), True)


def test_hbm_bytes_of_one_matmul_are_its_operands_and_result():
    pytest.importorskip("libtpu")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from customshift_jax.plan.pod import load_pod

    mesh = Mesh(np.array(load_pod("v5e:2x2").devices[:1]).reshape(1), ("x",))
    rep = NamedSharding(mesh, P())
    a = jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16, sharding=rep)
    b = jax.ShapeDtypeStruct((2048, 512), jnp.bfloat16, sharding=rep)
    stats = hlo.analyze(jax.jit(jnp.matmul).lower(a, b).compile().as_text())
    assert stats.hbm_bytes == 2 * (1024 * 2048 + 2048 * 512 + 1024 * 512) and not stats.collectives()
