"""An 8-step CustomShift sample with guidance: JAX sampler vs the PyTorch reference in a diffusers scheduler loop.

The torch side is `reference.torch_customshift.TorchCustomShift` (prefill once, CGB forward per step) driven by
diffusers' `FlowMatchEulerDiscreteScheduler` with CFG as `StableDiffusion3Pipeline` does it, and with reference
guidance written out in the loop (each CFG pass at gamma and at gamma 0: v0 + s (v - v0)). DESIGN section 7:
relative error <= 1e-4 for a full sampling loop.
"""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from customshift_jax import get_preset  # noqa: E402
from customshift_jax.crosscheck.mmdit import random_diffusers_transformer  # noqa: E402
from customshift_jax.customshift.branches import prefill  # noqa: E402
from customshift_jax.customshift.sampling import make_customshift_sampler  # noqa: E402
from customshift_jax.models.mmdit.lora import LoRAConfig  # noqa: E402
from customshift_jax.models.mmdit.mapping import params_from_state_dict  # noqa: E402
from customshift_jax.numerics import relative_error  # noqa: E402
from customshift_jax.reference.torch_customshift import TorchCustomShift  # noqa: E402
from customshift_jax.sampling import Conditioning, make_schedule  # noqa: E402

STEPS, GUIDANCE, GAMMA = 8, 5.0, 1.3
LORA = LoRAConfig(rank=4, alpha=8.0)


def _random_lora(config, branch, rng):
    from customshift_jax.io.lora_files import expected_lora_shapes

    return jax.tree_util.tree_map_with_path(
        lambda path, s: rng.normal(0.0, 0.5 if path[-1].key == "beta" else 0.05, s.shape).astype(np.float32),
        expected_lora_shapes(config, LORA, branch))


@pytest.mark.parametrize("reference_scale", [None, 2.0])
def test_eight_step_customshift_sample_matches_torch_reference(reference_scale):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = get_preset("tiny-sd3.5-medium")
    model = random_diffusers_transformer(config, seed=4)
    params = params_from_state_dict(config, model.state_dict())
    rng = np.random.default_rng(7)
    rab, cgb = _random_lora(config, "rab", rng), _random_lora(config, "cgb", rng)
    ts = TorchCustomShift(model, LORA.rank, LORA.alpha)
    ts.load_lora_from_jax(rab, cgb)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    j, p = config.joint_attention_dim, config.pooled_projection_dim
    ref, subject, subject_pooled = f(1, 16, 8, 8), f(1, 3, j), f(1, p)
    pe, pooled, neg, neg_pooled = f(2, 6, j), f(2, p), f(2, 6, j), f(2, p)
    x_t = f(2, 16, 8, 12)

    cache = prefill(config, params, ref, subject, subject_pooled, rab_lora=rab, lora_config=LORA)
    ours = make_customshift_sampler(config, LORA)(
        {"base": params, "cgb": cgb}, x_t, Conditioning(pe, pooled, neg, neg_pooled),
        make_schedule({"shift": 3.0}, STEPS), guidance_scale=GUIDANCE,
        extra={"ref_kv": cache.kv, "gamma": GAMMA, **({} if reference_scale is None else
                                                       {"reference_scale": reference_scale})})

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    t_ = torch.from_numpy
    with torch.no_grad():
        torch_cache = ts.prefill(t_(ref), t_(subject), t_(subject_pooled))
        latents = t_(x_t)
        ehs, pooled_cfg = torch.cat([t_(neg), t_(pe)]), torch.cat([t_(neg_pooled), t_(pooled)])
        for t in scheduler.timesteps:
            v = ts.forward(torch.cat([latents, latents]), t.expand(4), ehs, pooled_cfg, cache=torch_cache,
                           gamma=GAMMA)
            if reference_scale is not None:  # the same passes without the reference, then its own guidance
                v0 = ts.forward(torch.cat([latents, latents]), t.expand(4), ehs, pooled_cfg, cache=torch_cache,
                                gamma=0.0)
                v = v0 + reference_scale * (v - v0)
            v_uncond, v_text = v.chunk(2)
            latents = scheduler.step(v_uncond + GUIDANCE * (v_text - v_uncond), t, latents).prev_sample
    err = relative_error(ours, latents.numpy())
    print(f"8-step CustomShift sample (reference_scale {reference_scale}), JAX vs PyTorch reference: "
          f"relative error {err:.2e}")
    assert err <= 1e-4, f"8-step CustomShift sample: relative error {err:.2e}"
