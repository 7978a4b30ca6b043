"""README's Python code runs as written (on the tiny pipeline where it names /tmp/tiny-sd3), so README cannot rot."""
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run(tiny_pipeline_dir):
    blocks = python_blocks()
    assert blocks, "README has no python block"
    scopes = []
    for code in blocks:
        scope: dict = {}
        exec(compile(code.replace("/tmp/tiny-sd3", str(tiny_pipeline_dir)), "README.md", "exec"), scope)
        scopes.append(scope)
    _check_first_block(scopes[0])
    (api,) = [scope for scope in scopes if "sample" in scope]
    _check_api_block(api)


def _check_first_block(scope: dict) -> None:
    """README's first block (the pipeline on the shipped world model) shows what its comment says: one image a
    prompt, one prefill for both, the judge reading each prompt's context and the reference's body colour."""
    from PIL import Image

    images, contexts, read, star = scope["images"], scope["contexts"], scope["read"], scope["star"]
    assert scope["pipe"].prefills == 1
    assert len(images) == len(contexts) == 2
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in images)
    for factor in ("scene", "position", "size"):
        assert list(read[factor]) == [getattr(c, factor) for c in contexts], (factor, read[factor])
    assert list(read["body"]) == [star.body] * 2, read["body"]


def _check_api_block(scope: dict) -> None:
    """README's API block: its `sample` (the CustomShift forward at gamma 1) is the latents' shape and finite, the
    reference moves it away from the base model, and gamma=0 gives the base model exactly, as its comment says."""
    import customshift_jax as cs
    from customshift_jax.customshift import customshift_apply

    sample = np.asarray(scope["sample"])
    assert sample.shape == scope["latents"].shape and np.all(np.isfinite(sample)), sample.shape
    args = [scope[name] for name in ("config", "params", "latents")] + [500.0, scope["prompt_embeds"], scope["pooled"]]
    base = np.asarray(cs.mmdit_apply(*args))
    assert np.max(np.abs(sample - base)) > 1e-3  # the reference cache changes the prediction
    off = customshift_apply(*args, scope["cache"], cgb_lora=scope["cgb"], lora_config=scope["lora_config"], gamma=0.0)
    np.testing.assert_array_equal(np.asarray(off), base)


# ------------------------------------------------------------------------------------------- bash blocks
ROOT = README.parent
REAL_WEIGHTS = "(real weights"  # a README command carrying this in its comment needs weights no test has
TUTORIALS = ("## Convert, generate, customize", "## Training")  # the sections whose bash blocks run as written


def bash_commands(section: str | None = None) -> list[str]:
    """The commands of README's bash blocks (of one `## section`, or all): continuation lines joined,
    comments dropped."""
    text = README.read_text()
    if section is not None:
        text = text.split(section, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            code = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if code and REAL_WEIGHTS not in line:
                commands.append(code)
    return commands


def test_every_readme_customshift_command_parses():
    """Every `customshift ...` line of every bash block names a real subcommand and real flags (README cannot
    drift from the CLI), and every `python FILE` it names exists."""
    import shlex

    from customshift_jax.cli.main import build_parser

    parser = build_parser()
    commands = bash_commands()
    assert len(commands) > 10
    for command in commands:
        for part in command.split("&&"):
            argv = shlex.split(part)
            if argv[0] == "customshift":
                args, unknown = parser.parse_known_args(argv[1:])
                assert args.command and not unknown, f"README: {part!r} -> unknown {unknown}"
            elif argv[0] == "python" and argv[1] != "-m":
                assert (ROOT / argv[1]).is_file(), f"README names {argv[1]}, which does not exist"


def test_readme_tutorial_commands_run(tmp_path, monkeypatch, capsys):
    """The convert / generate / customize and training walk-throughs run as written on the tiny pipeline: /tmp
    paths moved under the test's folder, the working directory a fresh one, a two-record manifest.jsonl."""
    import json
    import shlex

    from customshift_jax.cli.main import main
    from customshift_jax.testing import tiny_pipeline

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    dog = sorted((ROOT / "examples" / "dog").glob("*.jpg"))
    (work / "manifest.jsonl").write_text("".join(json.dumps(
        {"reference": str(dog[i]), "target": str(dog[i + 1]), "caption": "a dog on the beach", "subject": "dog"})
        + "\n" for i in range(2)))
    ran = []
    for section in TUTORIALS:
        for command in bash_commands(section):
            command = (command.replace("/tmp/", f"{tmp_path}/").replace("examples/", f"{ROOT}/examples/")
                       .replace("train/configs/", f"{ROOT}/train/configs/"))
            argv = shlex.split(command)
            if argv[:3] == ["python", "-m", "customshift_jax.testing.tiny_pipeline"]:
                code = tiny_pipeline.main(argv[3:])
            else:
                assert argv[0] == "customshift", f"README runs {argv[0]!r}: teach this test how"
                code = main(argv[1:])
            assert code == 0, f"README command failed: {command}\n{capsys.readouterr().err[-2000:]}"
            ran.append(argv[1])
    assert {"convert", "export", "generate", "encode", "prepare", "train"} <= set(ran), ran
    assert list((work / "out").glob("*.png")) and (work / "dog.npz").is_file()
    assert (work / "runs" / "tiny" / "lora" / "customshift_cgb.safetensors").is_file()


def test_what_readme_commands_write_is_git_ignored():
    """Case 26 (part): README's commands write demo/, demo-N/, demo-seed0/, gen/, out/, out-N/, runs/ and dog.npz into the checkout;
    git ignores them (the shipped judge.npz under the package stays tracked)."""
    import subprocess

    written = ["demo/grid.png", "demo-2/grid.png", "demo-seed0/grid.png", "gen/00.png", "out/00.png", "out-2/00.png", "runs/tiny/metrics.jsonl", "dog.npz"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(written), r.stdout + r.stderr
    shipped = "customshift_jax/toyworld/weights/judge.npz"
    assert subprocess.run(["git", "check-ignore", "--no-index", "-q", shipped], cwd=ROOT).returncode == 1
