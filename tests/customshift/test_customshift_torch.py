"""The PyTorch reference of CustomShift (reference/torch_customshift.py) against the JAX branches, and the LoRA format.

fp32, highest matmul precision; random non-zero LoRA (A and B ~ N(0, 0.05)) and beta ~ N(0, 0.5), identical on
both sides through customshift_jax.io.lora_files. Tolerances are DESIGN section 7's: 1e-5 for a forward, 1e-4 per gradient leaf.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import rel_err  # noqa: E402

from customshift_jax import get_preset  # noqa: E402
from customshift_jax.crosscheck.mmdit import random_diffusers_transformer  # noqa: E402
from customshift_jax.customshift.branches import make_customshift_forward, make_prefill  # noqa: E402
from customshift_jax.io import lora_files as lora_format  # noqa: E402
from customshift_jax.models.mmdit.api import skip_mask  # noqa: E402
from customshift_jax.models.mmdit.lora import LoRAConfig  # noqa: E402
from customshift_jax.models.mmdit.mapping import StateDictMismatch, params_from_state_dict  # noqa: E402
from customshift_jax.reference.torch_customshift import TorchCustomShift  # noqa: E402

PRESETS = ("tiny-sd3-medium", "tiny-sd3.5-medium", "tiny-sd3.5-large")
SKIP = {"tiny-sd3.5-medium": (1,)}  # skip-layer guidance on one preset (a dual-attention layer)
RANK, ALPHA, GAMMA = 4, 8.0, 0.7  # scale 2: a wrong scale cannot hide
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


@dataclasses.dataclass
class Case:
    """One preset: the diffusers model with its torch wrapper, the JAX params, both LoRA trees, the inputs."""

    name: str
    config: object
    model: object
    ts: TorchCustomShift
    params: dict
    rab: dict
    cgb: dict
    inputs: dict  # numpy
    skip: tuple[int, ...]
    prefill: object
    forwards: dict


def random_lora(config, lora: LoRAConfig, branch: str, rng: np.random.Generator) -> dict:
    """A LoRA tree of the expected structure, every leaf random (B too: zero B would hide bugs)."""
    shapes = lora_format.expected_lora_shapes(config, lora, branch)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: rng.normal(0.0, 0.5 if path[-1].key == "beta" else 0.05, s.shape).astype(np.float32),
        shapes)


def _inputs(config, rng: np.random.Generator) -> dict:
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    c_in, j, p = config.in_channels, config.joint_attention_dim, config.pooled_projection_dim
    return dict(ref=f(1, c_in, 8, 8), subject=f(1, 3, j), subject_pooled=f(1, p),  # one reference, R = 16, S = 3
                x=f(2, c_in, 8, 12), t=np.array([250.0, 800.0], np.float32),  # batch 2, non-square 4 x 6 patches
                c=f(2, 5, j), pooled=f(2, p), target=f(2, config.out_channels, 8, 12))


@pytest.fixture(scope="module", params=PRESETS)
def case(request) -> Case:
    name = request.param
    config = get_preset(name)
    model = random_diffusers_transformer(config, seed=3)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_state_dict(config, model.state_dict()))
    rng = np.random.default_rng(PRESETS.index(name))
    lora = LoRAConfig(RANK, ALPHA)
    rab, cgb = random_lora(config, lora, "rab", rng), random_lora(config, lora, "cgb", rng)
    ts = TorchCustomShift(model, RANK, ALPHA)
    ts.load_lora_from_jax(rab, cgb)
    forwards = {s: jax.jit(make_customshift_forward(config, lora, shift=s)) for s in ("cads", "concat", "joint")}
    return Case(name, config, model, ts, params, rab, cgb, _inputs(config, rng), SKIP.get(name, ()),
                jax.jit(make_prefill(config, lora)), forwards)


def _t(a: np.ndarray):
    return torch.from_numpy(np.asarray(a))


def _jax_layers(config, kv: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """{group: (K, V) (L_g, B, N, H, D)} -> per layer (K, V) (B, N, H, D)."""
    out = []
    for start, stop in config.block_groups():
        k, v = kv[f"{start}:{stop}"]
        out.extend((np.asarray(k[j]), np.asarray(v[j])) for j in range(stop - start))
    return out


def _jax_prefill(c: Case):
    i = c.inputs
    return c.prefill(c.params, c.rab, i["ref"], i["subject"], i["subject_pooled"])


def _torch_prefill(c: Case):
    i = c.inputs
    return c.ts.prefill(_t(i["ref"]), _t(i["subject"]), _t(i["subject_pooled"]))


# ---- LoRA format ----

def test_lora_state_dict_round_trip_is_exact(case: Case, tmp_path):
    """JAX -> torch format -> JAX, directly, through the torch wrapper, and through the files: bit for bit."""
    lora = LoRAConfig(RANK, ALPHA)
    sd = lora_format.to_state_dict(case.rab, case.cgb)
    name = "transformer_blocks.0.attn.to_q"
    assert sd[f"{name}.lora_A.weight"].shape == (RANK, case.config.inner_dim)
    assert sd[f"rab.{name}.lora_B.weight"].shape == (case.config.inner_dim, RANK)
    assert sd["transformer_blocks.0.attn.cads_beta"].shape == (case.config.num_attention_heads,)
    np.testing.assert_array_equal(sd[f"{name}.lora_A.weight"], case.cgb["transformer_blocks"][
        next(f"{a}:{b}" for a, b in case.config.block_groups())]["scan"]["attn"]["to_q"]["lora_A"][0].T)

    def assert_same_trees(got, want):
        flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
        flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
        assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
        for (path, g), (_, w) in zip(flat_got, flat_want):
            assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
            assert np.array_equal(g, w), jax.tree_util.keystr(path)

    rab, cgb = lora_format.from_state_dict(case.config, lora, sd)
    assert_same_trees(rab, case.rab)
    assert_same_trees(cgb, case.cgb)

    exported = case.ts.export_lora_state_dict()
    assert set(exported) == set(sd)
    rab, cgb = lora_format.from_state_dict(case.config, lora, exported)
    assert_same_trees(rab, case.rab)
    assert_same_trees(cgb, case.cgb)

    written = lora_format.save_lora_files(tmp_path, exported, lora)
    assert [p.name for p in written] == [lora_format.CGB_FILE, lora_format.RAB_FILE, lora_format.BETA_FILE]
    loaded, loaded_cfg = lora_format.load_lora_files(tmp_path)
    assert loaded_cfg == lora
    rab, cgb = lora_format.from_state_dict(case.config, loaded_cfg, loaded)
    assert_same_trees(rab, case.rab)
    assert_same_trees(cgb, case.cgb)


def test_cgb_file_is_a_diffusers_lora(case: Case, tmp_path):
    """The CGB file reads through diffusers' own LoRA reader as a transformer LoRA of PEFT names and metadata."""
    from diffusers import StableDiffusion3Pipeline

    lora_format.save_lora_files(tmp_path, case.ts.export_lora_state_dict(), LoRAConfig(RANK, ALPHA))
    sd, metadata = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path), weight_name=lora_format.CGB_FILE,
                                                            return_lora_metadata=True)
    assert all("lora" in k for k in sd)  # load_lora_weights' format check
    transformer_sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
    assert len(transformer_sd) == len(sd)
    linears = {n: m for n, m in case.model.named_modules() if isinstance(m, torch.nn.Linear)}
    for key, value in transformer_sd.items():
        module, kind = key.rsplit(".lora_", 1)
        w = linears[module].weight
        assert kind in ("A.weight", "B.weight")
        assert tuple(value.shape) == ((RANK, w.shape[1]) if kind == "A.weight" else (w.shape[0], RANK))
    config = {k.removeprefix("transformer."): v for k, v in metadata.items()}
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == sorted({k.rsplit(".lora_", 1)[0] for k in transformer_sd})


def test_cgb_file_loads_with_peft_onto_plain_diffusers(case: Case, tmp_path):
    """With peft: plain diffusers + the CGB file as a PEFT adapter == the reference's CGB forward without cache."""
    pytest.importorskip("peft")
    lora_format.save_lora_files(tmp_path, case.ts.export_lora_state_dict(), LoRAConfig(RANK, ALPHA))
    plain = random_diffusers_transformer(case.config, seed=3)
    plain.load_lora_adapter(str(tmp_path), weight_name=lora_format.CGB_FILE, adapter_name="cgb")
    i = case.inputs
    with torch.no_grad():
        got = plain(hidden_states=_t(i["x"]), timestep=_t(i["t"]), encoder_hidden_states=_t(i["c"]),
                    pooled_projections=_t(i["pooled"]), return_dict=False)[0]
        want = case.ts.forward(_t(i["x"]), _t(i["t"]), _t(i["c"]), _t(i["pooled"]), None)
    assert rel_err(got.numpy(), want.numpy()) <= FWD_TOL


def test_wrong_rank_and_wrong_model_are_refused(case: Case):
    """A state dict of another rank or another model is refused, naming the key and the expected shape."""
    sd = case.ts.export_lora_state_dict()
    key = "transformer_blocks.0.attn.to_q.lora_A.weight"
    bad = dict(sd, **{key: torch.zeros(RANK + 1, case.config.inner_dim)})
    with pytest.raises(StateDictMismatch, match=rf"{key} \({RANK + 1}, {case.config.inner_dim}\) \(expected "
                                                rf"\({RANK}, {case.config.inner_dim}\)\)"):
        case.ts.load_lora_state_dict(bad)
    other = get_preset("tiny-sd3.5-medium" if case.name != "tiny-sd3.5-medium" else "tiny-sd3-medium")
    other_sd = lora_format.to_state_dict(random_lora(other, LoRAConfig(RANK, ALPHA), "rab", np.random.default_rng(0)),
                                         random_lora(other, LoRAConfig(RANK, ALPHA), "cgb", np.random.default_rng(1)))
    with pytest.raises(StateDictMismatch, match="transformer_blocks"):
        case.ts.load_lora_state_dict(other_sd)
    rank2 = LoRAConfig(2, ALPHA)
    rank2_sd = lora_format.to_state_dict(random_lora(case.config, rank2, "rab", np.random.default_rng(0)),
                                         random_lora(case.config, rank2, "cgb", np.random.default_rng(0)))
    with pytest.raises(StateDictMismatch, match=r"rank 4 expected, the state dict has rank 2"):
        lora_format.from_state_dict(case.config, LoRAConfig(RANK, ALPHA), rank2_sd)


# ---- forward parity ----

def test_prefill_matches_jax(case: Case):
    """Every layer's reference K and V (after qk-norm), (B_ref, R+S, H, D)."""
    jax_layers = _jax_layers(case.config, _jax_prefill(case))
    with torch.no_grad():
        torch_layers = _torch_prefill(case)
    assert len(torch_layers) == len(jax_layers) == case.config.num_layers
    worst = max(max(rel_err(jk, tk.numpy()), rel_err(jv, tv.numpy()))
                for (jk, jv), (tk, tv) in zip(jax_layers, torch_layers))
    print(f"{case.name} prefill: worst K/V rel err {worst:.2e}")
    for layer, ((jk, jv), (tk, tv)) in enumerate(zip(jax_layers, torch_layers)):
        assert tuple(tk.shape) == jk.shape == (1, 16 + 3, case.config.num_attention_heads,
                                               case.config.attention_head_dim)
        assert rel_err(jk, tk.numpy()) <= FWD_TOL, f"K of layer {layer}"
        assert rel_err(jv, tv.numpy()) <= FWD_TOL, f"V of layer {layer}"


@pytest.mark.parametrize("shift", ["cads", "concat", "joint"])
def test_cgb_forward_matches_jax(case: Case, shift: str):
    """One CGB step with the cache: batch 2 on one reference, non-square latents, gamma 0.7 (which concat and
    joint ignore); skip layers on one preset."""
    i = case.inputs
    kv = _jax_prefill(case)
    want_jax = case.forwards[shift](case.params, case.cgb, i["x"], i["t"], i["c"], i["pooled"],
                                    skip_mask(case.config, case.skip), kv, GAMMA)
    with torch.no_grad():
        cache = _torch_prefill(case)
        got = case.ts.forward(_t(i["x"]), _t(i["t"]), _t(i["c"]), _t(i["pooled"]), cache, gamma=GAMMA, shift=shift,
                              skip_layers=case.skip)
        base = case.ts.forward(_t(i["x"]), _t(i["t"]), _t(i["c"]), _t(i["pooled"]), None, skip_layers=case.skip)
    err = rel_err(np.asarray(want_jax), got.numpy())
    print(f"{case.name} {shift}: rel err {err:.2e}")
    assert err <= FWD_TOL
    assert rel_err(got.numpy(), base.numpy()) > 1e-3  # the reference path is live


def test_reference_is_inert_at_gamma_zero_and_lora_is_live(case: Case):
    """gamma = 0 removes the reference path; the random LoRA changes the output; plain calls stay diffusers."""
    i = case.inputs
    args = (_t(i["x"]), _t(i["t"]), _t(i["c"]), _t(i["pooled"]))
    with torch.no_grad():
        cache = _torch_prefill(case)
        no_ref = case.ts.forward(*args, None)
        at_zero = case.ts.forward(*args, cache, gamma=0.0)
        plain = case.model(hidden_states=args[0], timestep=args[1], encoder_hidden_states=args[2],
                           pooled_projections=args[3], return_dict=False)[0]
    assert rel_err(at_zero.numpy(), no_ref.numpy()) <= FWD_TOL
    assert rel_err(no_ref.numpy(), plain.numpy()) > 1e-3


def test_bad_cache_is_refused(case: Case):
    i = case.inputs
    with torch.no_grad():
        cache = _torch_prefill(case)
    with pytest.raises(ValueError, match="layers"):
        case.ts.forward(_t(i["x"]), _t(i["t"]), _t(i["c"]), _t(i["pooled"]), cache[:-1])
    bad = [(k[..., :-1], v[..., :-1]) for k, v in cache]
    with pytest.raises(ValueError, match="reference cache layer 0"):
        case.ts.forward(_t(i["x"]), _t(i["t"]), _t(i["c"]), _t(i["pooled"]), bad)


# ---- gradients ----

# Compiling jax.grad through the scanned blocks is the slow part: the preset with every block kind (dual
# attention, qk-norm, context_pre_only) and skip layers runs by default, the other two under -m slow.
GRAD_CASES = [pytest.param(p, marks=() if p == "tiny-sd3.5-medium" else pytest.mark.slow) for p in PRESETS]


@pytest.mark.parametrize("case", GRAD_CASES, indirect=True)
def test_gradients_match_jax(case: Case):
    """d loss / d (RAB LoRA, CGB LoRA, beta), with the cache made by prefill inside the loss: autograd == jax.grad."""
    i = case.inputs
    skip = skip_mask(case.config, case.skip)
    fwd = case.forwards["cads"]

    def loss(rab, cgb):
        kv = case.prefill(case.params, rab, i["ref"], i["subject"], i["subject_pooled"])
        out = fwd(case.params, cgb, i["x"], i["t"], i["c"], i["pooled"], skip, kv, GAMMA)
        return jnp.mean(jnp.square(out - i["target"]))

    g_rab, g_cgb = jax.jit(jax.grad(loss, argnums=(0, 1)))(case.rab, case.cgb)
    want = lora_format.to_state_dict(g_rab, g_cgb)

    case.ts.zero_grad(set_to_none=True)
    with torch.enable_grad():
        cache = _torch_prefill(case)
        out = case.ts.forward(_t(i["x"]), _t(i["t"]), _t(i["c"]), _t(i["pooled"]), cache, gamma=GAMMA,
                              skip_layers=case.skip)
        torch.mean(torch.square(out - _t(i["target"]))).backward()
    got = {k: v.numpy() for k, v in case.ts.lora_grad_state_dict().items()}
    case.ts.zero_grad(set_to_none=True)

    assert set(got) == set(want)
    errors = {k: rel_err(want[k], got[k]) for k in want}
    worst = max(errors, key=errors.get)
    print(f"{case.name}: {len(errors)} gradient leaves, worst {worst} rel err {errors[worst]:.2e}")
    bad = {k: e for k, e in errors.items() if e > GRAD_TOL}
    assert not bad, bad
    live = [k for k in want if np.abs(want[k]).max() > 0]
    assert any(k.startswith("rab.") for k in live) and any(k.endswith("cads_beta") for k in live)
    for layer in case.skip:  # a skipped layer's CGB LoRA and beta get nothing
        assert not any(k.startswith(f"transformer_blocks.{layer}.") for k in live)


def test_files_metadata_is_json(case: Case, tmp_path):
    """Each file names its branch, rank, alpha and targets; diffusers' metadata is the peft.LoraConfig fields."""
    from safetensors import safe_open

    lora_format.save_lora_files(tmp_path, case.ts.export_lora_state_dict(), LoRAConfig(RANK, ALPHA))
    with safe_open(str(tmp_path / lora_format.RAB_FILE), framework="numpy") as f:
        meta = f.metadata()
        assert json.loads(meta[lora_format.CUSTOMSHIFT_METADATA_KEY])["branch"] == "rab"
        assert json.loads(meta[lora_format.LORA_ADAPTER_METADATA_KEY])["transformer.r"] == RANK
        assert all(k.startswith("transformer.transformer_blocks.") for k in f.keys())
    with safe_open(str(tmp_path / lora_format.BETA_FILE), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(f"transformer_blocks.{n}.attn.cads_beta"
                                          for n in range(case.config.num_layers))
