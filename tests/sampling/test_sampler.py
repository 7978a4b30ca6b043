"""The JAX sampler equals diffusers' StableDiffusion3Pipeline (fp32, same latents and embeddings): flow-match Euler
schedule, CFG, skip-layer guidance, dynamic shifting, no-CFG, VAE decode (DESIGN section 7: rel err <= 1e-4 for a
full sampling loop); schedules equal the diffusers scheduler's; keys are deterministic; `extra` is threaded."""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from conftest import DYNAMIC_SHIFT, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from customshift_jax.io.loading import load_transformer  # noqa: E402
from customshift_jax.sampling import (  # noqa: E402
    Conditioning,
    Schedule,
    image_seq_len,
    initial_latents,
    load_scheduler_config,
    make_sampler,
    make_schedule,
    sample,
    skip_layer_guidance,
    slg_active_steps,
)

TOL = 1e-4  # DESIGN section 7: a full sampling loop in fp32
SCHED_TOL = 1e-6
HEIGHT, WIDTH, BATCH, TEXT_LEN = 32, 48, 2, 10  # pixels; the tiny VAE's scale factor is 2 -> latents 16x24


@dataclasses.dataclass
class Inputs:
    """Initial latents and precomputed embeddings, numpy float32, diffusers' layout."""

    latents: np.ndarray  # (B, 16, H/2, W/2)
    prompt_embeds: np.ndarray  # (B, M, J)
    pooled: np.ndarray  # (B, P)
    negative_prompt_embeds: np.ndarray
    negative_pooled: np.ndarray

    @classmethod
    def random(cls, cfg, vae_scale_factor: int = 2, seed: int = 0) -> "Inputs":
        """`cfg`: a diffusers transformer config or an MMDiTConfig (both name the widths alike)."""
        f = vae_scale_factor
        rng = np.random.default_rng(seed)

        def r(*shape):
            return rng.standard_normal(shape).astype(np.float32)

        return cls(r(BATCH, cfg.in_channels, HEIGHT // f, WIDTH // f), r(BATCH, TEXT_LEN, cfg.joint_attention_dim),
                   r(BATCH, cfg.pooled_projection_dim), r(BATCH, TEXT_LEN, cfg.joint_attention_dim),
                   r(BATCH, cfg.pooled_projection_dim))

    def conditioning(self, negatives: bool = True) -> Conditioning:
        if not negatives:
            return Conditioning(self.prompt_embeds, self.pooled)
        return Conditioning(self.prompt_embeds, self.pooled, self.negative_prompt_embeds, self.negative_pooled)


def run_pipe(pipe, x: Inputs, *, steps: int, guidance: float, output_type: str = "latent", **kwargs) -> np.ndarray:
    """The diffusers pipeline on precomputed embeddings and given initial latents."""
    t = torch.from_numpy
    neg = {}
    if guidance > 1:
        neg = dict(negative_prompt_embeds=t(x.negative_prompt_embeds),
                   negative_pooled_prompt_embeds=t(x.negative_pooled))
    with torch.no_grad():
        out = pipe(height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=guidance,
                   latents=t(x.latents), prompt_embeds=t(x.prompt_embeds), pooled_prompt_embeds=t(x.pooled),
                   output_type=output_type, **neg, **kwargs).images
    return out.float().numpy()


@functools.lru_cache(maxsize=None)
def _sampler(config):
    """One jitted sampler per transformer config (folders of the same shape share its compiled code)."""
    return make_sampler(config)


@functools.lru_cache(maxsize=None)
def _jax_model(path: str):
    """(config, params, jitted sampler) for a pipeline folder, loaded once per folder."""
    config, params = load_transformer(path)
    return config, params, _sampler(config)


def jax_sample(path, x: Inputs, schedule: Schedule, *, guidance: float, slg=None, negatives: bool = True):
    config, params, run = _jax_model(str(path))
    return np.asarray(run(params, x.latents, x.conditioning(negatives), schedule, guidance_scale=guidance, slg=slg))


# ---------------------------------------------------------------------------------------------------- schedule

SCHEDULER_CASES = [
    {"shift": 3.0},
    {"shift": 1.0},
    {"shift": 1.7},
    {"shift": 3.0, **DYNAMIC_SHIFT},
    {"shift": 3.0, **DYNAMIC_SHIFT, "time_shift_type": "linear"},
    {"shift": 3.0, "shift_terminal": 0.02},
    {"shift": 3.0, "use_karras_sigmas": True},
    {"shift": 3.0, "use_exponential_sigmas": True},
]


@pytest.mark.parametrize("steps", [1, 8, 28])
@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())[:60])
def test_schedule_matches_diffusers_scheduler(case, steps):
    if steps == 1 and case.get("shift_terminal"):
        pytest.skip("shift_terminal with one step is 0/0 in diffusers too (covered by the error test)")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**case)
    seq_len = image_seq_len(16, 24, 2)
    kwargs = {}
    if case.get("use_dynamic_shifting"):
        kwargs["mu"] = diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3.calculate_shift(
            seq_len, sched.config.base_image_seq_len, sched.config.max_image_seq_len, sched.config.base_shift,
            sched.config.max_shift)
    sched.set_timesteps(steps, **kwargs)
    ours = make_schedule(dict(sched.config), steps, image_seq_len=seq_len)
    assert ours.sigmas.dtype == ours.timesteps.dtype == np.float32
    assert ours.sigmas.shape == (steps + 1,) and ours.timesteps.shape == (steps,) and ours.sigmas[-1] == 0
    assert rel_err(ours.sigmas, sched.sigmas.numpy()) <= SCHED_TOL
    assert rel_err(ours.timesteps, sched.timesteps.numpy()) <= SCHED_TOL


def test_schedule_custom_sigmas_and_folder(sampler_sd3m_dir):
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(sampler_sd3m_dir, subfolder="scheduler")
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    sched.set_timesteps(sigmas=sigmas)
    for source in (sampler_sd3m_dir, sampler_sd3m_dir / "scheduler",
                   sampler_sd3m_dir / "scheduler" / "scheduler_config.json"):
        ours = make_schedule(source, sigmas=sigmas)
        assert rel_err(ours.sigmas, sched.sigmas.numpy()) <= SCHED_TOL
        assert rel_err(ours.timesteps, sched.timesteps.numpy()) <= SCHED_TOL
    assert load_scheduler_config(sampler_sd3m_dir)["shift"] == 3.0


def test_schedule_errors(tmp_path):
    with pytest.raises(ValueError, match="dynamic shifting: pass image_seq_len"):
        make_schedule(DYNAMIC_SHIFT, 8)
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        make_schedule(tmp_path, 8)
    with pytest.raises(ValueError, match="only FlowMatchEulerDiscreteScheduler"):
        make_schedule({"_class_name": "DDIMScheduler"}, 8)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        make_schedule({"stochastic_sampling": True}, 8)
    with pytest.raises(ValueError, match="positive integer"):
        make_schedule({"shift": 3.0}, 0)
    with pytest.raises(ValueError, match="non-finite"):
        make_schedule({"shift": 3.0, "shift_terminal": 0.02}, 1)
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        make_schedule(tmp_path, 8)


def test_slg_active_steps_follow_the_pipelines_float64_test():
    # diffusers: `i > T * start and i < T * stop` in float64. 25 * 0.28 = 7.000000000000001, so step 7 is in
    # (in float32 the product is 7.0 and it would be out).
    assert np.flatnonzero(slg_active_steps(25, 0.01, 0.28)).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert np.flatnonzero(slg_active_steps(10, 0.1, 0.3)).tolist() == [2]
    assert np.flatnonzero(slg_active_steps(28)).tolist() == [1, 2, 3, 4, 5]  # defaults 0.01, 0.2
    assert np.flatnonzero(slg_active_steps(8)).tolist() == [1]  # default window at 8 steps: step 1 only


# ------------------------------------------------------------------------------------- parity with the pipeline

def test_cfg_matches_pipeline(sd3m_pipe, sampler_sd3m_dir):
    x = Inputs.random(sd3m_pipe.transformer.config, sd3m_pipe.vae_scale_factor, seed=0)
    ref = run_pipe(sd3m_pipe, x, steps=8, guidance=5.0)
    out = jax_sample(sampler_sd3m_dir, x, make_schedule(sampler_sd3m_dir, 8), guidance=5.0)
    err = rel_err(out, ref)
    print(f"cfg (guidance 5, 8 steps, batch 2, 32x48 px): rel err {err:.2e}")
    assert out.shape == ref.shape == x.latents.shape
    assert err <= TOL
    # The test can fail: a wrong shift (2.0 for 3.0) or a wrong guidance scale is far outside the tolerance.
    wrong_shift = jax_sample(sampler_sd3m_dir, x, make_schedule({"shift": 2.0}, 8), guidance=5.0)
    assert rel_err(wrong_shift, ref) > 100 * TOL
    wrong_guidance = jax_sample(sampler_sd3m_dir, x, make_schedule(sampler_sd3m_dir, 8), guidance=4.0)
    assert rel_err(wrong_guidance, ref) > 100 * TOL


def test_no_cfg_matches_pipeline(sd3m_pipe, sampler_sd3m_dir):
    x = Inputs.random(sd3m_pipe.transformer.config, sd3m_pipe.vae_scale_factor, seed=1)
    ref = run_pipe(sd3m_pipe, x, steps=8, guidance=1.0)
    out = jax_sample(sampler_sd3m_dir, x, make_schedule(sampler_sd3m_dir, 8), guidance=1.0, negatives=False)
    err = rel_err(out, ref)
    print(f"no cfg (guidance 1, 8 steps): rel err {err:.2e}")
    assert err <= TOL


def test_skip_layer_guidance_matches_pipeline(sd35m_pipe, sampler_sd35m_dir):
    x = Inputs.random(sd35m_pipe.transformer.config, sd35m_pipe.vae_scale_factor, seed=2)
    steps, layers, scale, start, stop = 10, [1, 2], 2.8, 0.1, 0.45  # SLG on steps 2, 3, 4
    ref = run_pipe(sd35m_pipe, x, steps=steps, guidance=5.0, skip_guidance_layers=layers,
                   skip_layer_guidance_scale=scale, skip_layer_guidance_start=start, skip_layer_guidance_stop=stop)
    config = _jax_model(str(sampler_sd35m_dir))[0]
    slg = skip_layer_guidance(config, layers, steps, scale=scale, start=start, stop=stop)
    schedule = make_schedule(sampler_sd35m_dir, steps)
    out = jax_sample(sampler_sd35m_dir, x, schedule, guidance=5.0, slg=slg)
    err = rel_err(out, ref)
    print(f"slg (sd3.5m-shaped, layers {layers}, steps 2-4 of {steps}): rel err {err:.2e}")
    assert err <= TOL
    # SLG changes the result well beyond the tolerance, so dropping it (or one of its steps) would fail.
    no_slg = jax_sample(sampler_sd35m_dir, x, schedule, guidance=5.0,
                        slg=dataclasses.replace(slg, active=np.zeros_like(slg.active)))  # same compiled code
    assert rel_err(no_slg, ref) > 100 * TOL
    only_step_2 = dataclasses.replace(slg, active=slg_active_steps(steps, 0.1, 0.25))
    assert rel_err(jax_sample(sampler_sd35m_dir, x, schedule, guidance=5.0, slg=only_step_2), ref) > 10 * TOL


def test_dynamic_shifting_matches_pipeline(dynamic_pipe, sampler_dynamic_dir):
    x = Inputs.random(dynamic_pipe.transformer.config, dynamic_pipe.vae_scale_factor, seed=3)
    ref = run_pipe(dynamic_pipe, x, steps=8, guidance=5.0)
    h, w = x.latents.shape[2:]
    schedule = make_schedule(sampler_dynamic_dir, 8, image_seq_len=image_seq_len(h, w, 2))
    assert rel_err(schedule.sigmas, dynamic_pipe.scheduler.sigmas.numpy()) <= SCHED_TOL  # as set by that call
    out = jax_sample(sampler_dynamic_dir, x, schedule, guidance=5.0)
    err = rel_err(out, ref)
    print(f"dynamic shifting (mu from {h // 2 * (w // 2)} tokens): rel err {err:.2e}")
    assert err <= TOL
    static = jax_sample(sampler_dynamic_dir, x, make_schedule({"shift": 3.0}, 8), guidance=5.0)
    assert rel_err(static, ref) > 100 * TOL


def test_decode_matches_pipeline(sd3m_pipe, sampler_sd3m_dir):
    from customshift_jax.io.loading import load_vae

    x = Inputs.random(sd3m_pipe.transformer.config, sd3m_pipe.vae_scale_factor, seed=4)
    ref = run_pipe(sd3m_pipe, x, steps=4, guidance=5.0, output_type="pt")  # (B, 3, H, W) in [0, 1]
    config, params, _ = _jax_model(str(sampler_sd3m_dir))
    vae_config, vae_params = load_vae(sampler_sd3m_dir)
    run = make_sampler(config, decode=True, vae_config=vae_config)
    images = run(params, x.latents, x.conditioning(), make_schedule(sampler_sd3m_dir, 4), guidance_scale=5.0,
                 vae_params=vae_params)
    out = np.clip(np.asarray(images) * 0.5 + 0.5, 0.0, 1.0)  # the pipeline's postprocess (denormalize)
    err = rel_err(out, ref)
    print(f"decode (4 steps + VAE): rel err {err:.2e}")
    assert out.shape == ref.shape == (BATCH, 3, HEIGHT, WIDTH)
    assert err <= TOL


# --------------------------------------------------------------------------------------- keys, extra, errors

def test_same_key_same_output_different_keys_differ(sampler_sd3m_dir):
    config, params, run = _jax_model(str(sampler_sd3m_dir))  # no VAE given: pixel sizes use SD3's factor 8
    x = Inputs.random(config, seed=5)
    schedule = make_schedule(sampler_sd3m_dir, 3)
    kw = dict(guidance_scale=5.0, height=64, width=96)
    a = np.asarray(run(params, None, x.conditioning(), schedule, key=jax.random.key(0), **kw))
    b = np.asarray(run(params, None, x.conditioning(), schedule, key=jax.random.key(0), **kw))
    c = np.asarray(run(params, None, x.conditioning(), schedule, key=jax.random.key(1), **kw))
    assert a.shape == (BATCH, config.in_channels, 8, 12)
    assert np.array_equal(a, b)
    assert rel_err(c, a) > 1e-2
    # The key path is the explicit-latents path from initial_latents(key), which is jax.random.normal(key, shape).
    d = np.asarray(run(params, initial_latents(jax.random.key(0), a.shape), x.conditioning(), schedule,
                       guidance_scale=5.0))
    assert np.array_equal(a, d)
    small = (1, 4, 2, 3)  # (XLA:CPU compiles jax.random.normal of a large 4-D shape slowly)
    assert np.array_equal(initial_latents(jax.random.key(7), small), jax.random.normal(jax.random.key(7), small))


def test_extra_inputs_are_threaded_as_jit_inputs():
    # A toy forward v = w * x + t / 1000 + mean(ehs) + offset, with `offset` an extra keyword input; checked against
    # a numpy Euler loop, and a new `offset` must not recompile (it is a jit input, not a baked-in constant).
    def forward(params, x, t, ehs, pooled, skip, *, offset):
        assert skip.shape == (2,)
        return (params["w"] * x + t[:, None, None, None] / 1000 + ehs.mean(axis=(1, 2))[:, None, None, None]
                + pooled.mean(axis=1)[:, None, None, None] * skip.sum() + offset["o"])

    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 1, 2, 2)).astype(np.float32)
    cond = Conditioning(*(rng.standard_normal(s).astype(np.float32) for s in [(2, 3, 4), (2, 5), (2, 3, 4), (2, 5)]))
    schedule = make_schedule({"shift": 3.0}, 5)
    params = {"w": np.float32(-0.5)}
    slg = skip_layer_guidance(2, [1], 5, scale=2.0, start=0.1, stop=0.7)
    calls = []

    @jax.jit
    def run(params, lat, cond, schedule, slg, offset):
        calls.append(1)
        return sample(forward, params, lat, cond, schedule, guidance_scale=3.0, num_layers=2, slg=slg,
                      extra={"offset": offset})

    def reference(o):
        xk = lat.astype(np.float64)
        pe, pp, npe, npp = (np.asarray(a, np.float64) for a in
                            (cond.prompt_embeds, cond.pooled_prompt_embeds, cond.negative_prompt_embeds,
                             cond.negative_pooled_prompt_embeds))
        for i, t in enumerate(schedule.timesteps):
            def v(e, p, skipped):
                return -0.5 * xk + t / 1000 + e.mean(axis=(1, 2))[:, None, None, None] + \
                    p.mean(axis=1)[:, None, None, None] * skipped + o
            text, unc = v(pe, pp, 0), v(npe, npp, 0)
            out = unc + 3.0 * (text - unc)
            if slg.active[i]:
                out = out + (text - v(pe, pp, 1)) * 2.0
            xk = xk + (float(schedule.sigmas[i + 1]) - float(schedule.sigmas[i])) * out
        return xk

    for o in (0.0, 0.25):
        out = run(params, lat, cond, schedule, slg, {"o": np.float32(o)})
        assert rel_err(out, reference(o)) <= 1e-5
    assert len(calls) == 1, "a new extra value retraced the sampler"


def test_errors_speak_to_the_user(sampler_sd3m_dir):
    config, params, run = _jax_model(str(sampler_sd3m_dir))
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((BATCH, 16, 16, 24)).astype(np.float32)
    pe = rng.standard_normal((BATCH, TEXT_LEN, config.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((BATCH, config.pooled_projection_dim)).astype(np.float32)
    schedule = make_schedule(sampler_sd3m_dir, 4)
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        run(params, lat, Conditioning(pe, pooled), schedule, guidance_scale=5.0)
    with pytest.raises(ValueError, match="hidden_states must be"):
        run(params, lat[:, :8], Conditioning(pe, pooled), schedule, guidance_scale=1.0)
    with pytest.raises(ValueError, match="latents must be"):
        run(params, lat[0], Conditioning(pe, pooled), schedule, guidance_scale=1.0)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        run(params, lat[:1], Conditioning(pe, pooled), schedule, guidance_scale=1.0)
    with pytest.raises(ValueError, match="negative embeddings must have the prompt's shapes"):
        run(params, lat, Conditioning(pe, pooled, pe[:, :3], pooled), schedule, guidance_scale=5.0)
    with pytest.raises(ValueError, match="divisible by 16"):
        run(params, None, Conditioning(pe, pooled), schedule, guidance_scale=1.0, key=jax.random.key(0),
            height=40, width=48)
    with pytest.raises(ValueError, match="either latents"):
        run(params, None, Conditioning(pe, pooled), schedule, guidance_scale=1.0)
    with pytest.raises(ValueError, match="built for 8 steps but the schedule has 4"):
        run(params, lat, Conditioning(pe, pooled, pe, pooled), schedule, guidance_scale=5.0,
            slg=skip_layer_guidance(config, [1], 8))
    with pytest.raises(ValueError, match="outside 0..2"):
        skip_layer_guidance(config, [3], 4)
    with pytest.raises(ValueError, match="decode=True\\) needs vae_config"):
        make_sampler(config, decode=True)
    with pytest.raises(ValueError, match="pass cfg=True/False"):
        jax.jit(lambda g: sample(lambda *a: a[1], params, lat, Conditioning(pe, pooled), schedule,
                                 guidance_scale=g, num_layers=config.num_layers))(5.0)
    with pytest.warns(UserWarning, match="ignored without classifier-free guidance"):
        run(params, lat, Conditioning(pe, pooled), schedule, guidance_scale=1.0,
            slg=skip_layer_guidance(config, [1], 4))
