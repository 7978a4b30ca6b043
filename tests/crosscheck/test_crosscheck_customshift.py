"""`customshift crosscheck --customshift`: passes on the PyTorch reference, fails (naming the rows) on a wrong one.

One tiny preset (qk-norm, context_pre_only; 3 layers, to stay quick), batch 2, 8 x 12 latents; the
jitted JAX functions are cached across the tests, so only the first one compiles.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from customshift_jax import get_preset  # noqa: E402
from customshift_jax.cli.main import main  # noqa: E402
from customshift_jax.crosscheck.customshift import random_lora  # noqa: E402
from customshift_jax.io import lora_files as lora_format  # noqa: E402
from customshift_jax.models.mmdit.lora import LoRAConfig  # noqa: E402
from customshift_jax.reference.torch_customshift import TorchCustomShift  # noqa: E402

PRESET = "tiny-sd3.5-large"
ARGS = ["crosscheck", "--customshift", "--presets", PRESET, "--batch", "2", "--height", "8", "--width", "12"]
LAYERS = get_preset(PRESET).num_layers


def _run(tmp_path, *extra: str) -> tuple[int, list[dict]]:
    """Exit code and the JSON rows of one crosscheck run."""
    out = tmp_path / "rows.json"
    code = main([*ARGS, "--json", str(out), *extra])
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    return code, data["rows"]


def _quantities(rows: list[dict]) -> set[str]:
    return {r["quantity"] for r in rows}


def test_customshift_crosscheck_passes(tmp_path, capsys):
    """Every row within DESIGN section 7's bound: prefill K/V per layer, CGB cads at 3 gammas, concat and joint,
    sample."""
    code, rows = _run(tmp_path)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "all passed" in printed and "FAIL" not in printed
    want = {f"prefill {kv} layer {n}" for kv in "KV" for n in range(LAYERS)}
    want |= {f"CGB forward cads gamma={g}" for g in ("0.5", "1", "2")} | {"CGB forward concat", "CGB forward joint"}
    want |= {"sample 4 steps cfg=5 gamma=1.5"}
    assert _quantities(rows) == want
    for r in rows:
        assert r["pass"] and r["name"] == PRESET and r["rel_error"] <= r["tolerance"], r
        assert r["tolerance"] == (1e-4 if r["quantity"].startswith("sample") else 1e-5), r
        assert r["quantity"] in printed


def _ignore_beta(monkeypatch) -> None:
    """A wrong reference: lambda = log(gamma) for "cads", beta dropped (the bug a parity check must catch)."""
    def shift_logits(self, gamma=1.0, shift="cads"):
        if shift in ("concat", "joint"):
            return torch.zeros_like(self.beta, dtype=torch.float32)
        return torch.log(torch.as_tensor(gamma, dtype=torch.float32)).expand(self.beta.shape)

    monkeypatch.setattr(TorchCustomShift, "shift_logits", shift_logits)


def test_customshift_crosscheck_fails_on_a_reference_without_beta(tmp_path, capsys, monkeypatch):
    """Beta not applied: the cads rows (forward and per block) and the sample fail, named; prefill, concat and
    joint pass."""
    _ignore_beta(monkeypatch)
    code, rows = _run(tmp_path, "--per-block", "--gammas", "2")
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "FAILED" in printed
    failed = {r["quantity"] for r in rows if not r["pass"]}
    assert "CGB forward cads gamma=2" in failed and "sample 4 steps cfg=5 gamma=1.5" in failed
    assert "CGB forward cads gamma=2 block 0 image" in failed  # the first block already differs: named
    for q in failed:
        assert q.startswith(("CGB forward cads", "sample")), q
    assert all(r["pass"] for r in rows if r["quantity"].startswith(("prefill", "CGB forward concat",
                                                                     "CGB forward joint")))
    fail_lines = [line for line in printed.splitlines() if line.endswith("FAIL")]
    assert len(fail_lines) == len(failed) and all(PRESET in line for line in fail_lines)


def test_customshift_crosscheck_with_a_lora_folder(tmp_path, capsys):
    """--lora DIR reads the user's files (here random ones of the preset); a LoRA of another model: one-line error."""
    config = get_preset(PRESET)
    lora = LoRAConfig(4, 8.0)  # the default random rank and alpha: the compiled functions are reused
    rng = np.random.default_rng(11)
    sd = lora_format.to_state_dict(random_lora(config, lora, "rab", rng), random_lora(config, lora, "cgb", rng))
    lora_format.save_lora_files(tmp_path / "lora", sd, lora)
    code, rows = _run(tmp_path, "--lora", str(tmp_path / "lora"))
    printed = capsys.readouterr().out
    assert code == 0 and rows and all(r["pass"] for r in rows), printed

    code = main([*ARGS[:3], "tiny-sd3.5-medium", *ARGS[4:], "--lora", str(tmp_path / "lora")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: --lora") and "tiny-sd3.5-medium" in err


def test_customshift_only_flags_need_customshift(capsys):
    """--grads and --lora without --customshift are refused in one line, before anything is built."""
    assert main(["crosscheck", "--grads"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --grads needs --customshift."


@pytest.mark.slow
def test_customshift_crosscheck_gradients(tmp_path, capsys):
    """--grads: d loss / d (RAB LoRA, CGB LoRA, beta) per branch and layer within 1e-4 (compiles the backward)."""
    code, rows = _run(tmp_path, "--grads")
    printed = capsys.readouterr().out
    assert code == 0, printed
    grads = [r for r in rows if r["quantity"].startswith("grad ")]
    assert len(grads) == 3 * LAYERS and all(r["pass"] and r["tolerance"] == 1e-4 for r in grads)
