"""SD3's text encoders in our checkpoint: `customshift convert --components text_encoders`, loading them into the
JAX encoders (equal to transformers on the source folder), the refusals (damaged piece or tokenizer file, missing
key, wrong shape, truncated shard, no encoders), `generate` picking the JAX backend from such a checkpoint, and
`customshift export` writing them back for diffusers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


from customshift_jax.cli.main import main
from customshift_jax.io.checkpoint import checkpoint_components, checkpoint_folders, load_checkpoint
from customshift_jax.io.integrity import DamagedCheckpoint
from customshift_jax.io.safetensors import SafetensorsFile, write_safetensors
from customshift_jax.numerics import relative_error
from customshift_jax.text import TextEncoders, load_text_encoders
from customshift_jax.text.backends import resolve_text_backend
from customshift_jax.text.jax import JaxTextEncoders

TOL = 1e-5
ENCODERS = ["text_encoder", "text_encoder_2", "text_encoder_3"]
TOKENIZERS = ["tokenizer", "tokenizer_2", "tokenizer_3"]
PROMPTS = ["a sks dog wearing a santa hat", "a red backpack on top of a purple rug in a forest"]


@pytest.fixture(scope="module")
def full_ckpt(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline converted with its transformer, VAE and text encoders."""
    dst = tmp_path_factory.mktemp("text_ckpt") / "full"
    assert main(["convert", str(tiny_pipeline_dir), str(dst), "--components", "transformer,vae,text_encoders",
                 "--no-progress"]) == 0
    return dst


def _convert_text(src, dst) -> int:
    return main(["convert", str(src), str(dst), "--components", "text_encoders", "--no-progress"])


def test_convert_stores_encoders_and_tokenizers_and_encode_equals_transformers(full_ckpt, tiny_pipeline_dir):
    assert checkpoint_components(full_ckpt) == ["transformer", "vae", *ENCODERS]
    assert checkpoint_folders(full_ckpt) == TOKENIZERS
    for name in ENCODERS:  # the transformers config.json, as it was
        assert (full_ckpt / name / "config.json").read_text() == (tiny_pipeline_dir / name / "config.json").read_text()
    ours = load_text_encoders(full_ckpt)  # default backend: jax for our checkpoint
    assert isinstance(ours, JaxTextEncoders)
    ref = TextEncoders.from_pretrained(tiny_pipeline_dir)
    kw = {"max_sequence_length": 24, "num_images_per_prompt": 2}
    got = ours.encode(PROMPTS, ["blurry", ""], **kw).arrays()
    want = ref.encode(PROMPTS, ["blurry", ""], **kw).arrays()
    assert got.keys() == want.keys()
    for k in want:
        assert relative_error(got[k], want[k]) <= TOL, k
    assert ours.identity != JaxTextEncoders.from_pretrained(tiny_pipeline_dir).identity


def test_text_encoders_alone_and_a_flipped_byte_refused_by_name(tiny_pipeline_dir, tmp_path):
    ckpt = tmp_path / "text"
    assert _convert_text(tiny_pipeline_dir, ckpt) == 0
    assert checkpoint_components(ckpt) == ENCODERS
    good = load_checkpoint(ckpt, ["text_encoder_2"])["text_encoder_2"][1]
    leaf = np.ascontiguousarray(good["text_model"]["embeddings"]["token_embedding"]["embedding"]).tobytes()
    for path in sorted((ckpt / "text_encoder_2" / "params").rglob("*")):
        if path.is_file() and (at := path.read_bytes().find(leaf)) >= 0:
            data = bytearray(path.read_bytes())
            data[at + len(leaf) // 2] ^= 0x40
            path.write_bytes(bytes(data))
            break
    else:
        raise AssertionError("the embedding's bytes are not stored as they are")
    with pytest.raises(DamagedCheckpoint, match=r"the text_encoder_2 params piece .*part-00000 is damaged"):
        JaxTextEncoders.from_checkpoint(ckpt)

    ckpt2 = tmp_path / "text2"
    assert _convert_text(tiny_pipeline_dir, ckpt2) == 0
    vocab = ckpt2 / "tokenizer_3" / "spiece.model"
    data = bytearray(vocab.read_bytes())
    data[len(data) // 2] ^= 0x01
    vocab.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=r"the tokenizer_3 file .*spiece\.model is damaged"):
        JaxTextEncoders.from_checkpoint(ckpt2)


def _pipeline_copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("transformer", "vae"))
    st = SafetensorsFile(dst / "text_encoder_3" / "model.safetensors")
    return {k: np.array(st.get(k)) for k in st.keys()}  # noqa: SIM118 (no __iter__)


@pytest.mark.parametrize("damage, message", [
    ("missing", r"1 tensors missing .*'encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight'"),
    ("shape", r"wrong shape.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight has shape"),
    ("truncated", r"text_encoder_3/model\.safetensors.*truncated"),
    ("no_clip_g", r"no text_encoder_2/ folder; --components text_encoders needs"),
])
def test_convert_refuses_a_bad_source_by_name(tiny_pipeline_dir, tmp_path, capsys, damage, message):
    src = tmp_path / "src"
    tensors = _pipeline_copy(tiny_pipeline_dir, src)
    key, file = "encoder.block.1.layer.1.DenseReluDense.wo.weight", src / "text_encoder_3" / "model.safetensors"
    if damage == "missing":
        write_safetensors(file, {k: v for k, v in tensors.items() if k != key})
    elif damage == "shape":
        write_safetensors(file, {**tensors, key: tensors[key][:, :-1]})
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    else:
        shutil.rmtree(src / "text_encoder_2")
    assert _convert_text(src, tmp_path / "dst") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "dst").exists()


def test_generate_from_the_checkpoint_equals_torch_on_the_source(full_ckpt, tiny_pipeline_dir, tmp_path, capsys):
    """No --text-encoders, default backend: the checkpoint's encoders in JAX; against PyTorch on the source."""
    assert resolve_text_backend(full_ckpt) == "jax" and resolve_text_backend(tiny_pipeline_dir) == "torch"
    common = ["generate", "--checkpoint", str(full_ckpt), "--prompt", "a dog on the beach", "--height", "16",
              "--width", "16", "--steps", "2", "--max-sequence-length", "16"]
    runs = {"ckpt": [], "torch": ["--text-encoders", str(tiny_pipeline_dir), "--text-backend", "torch"]}
    for name, extra in runs.items():
        code = main([*common, *extra, "--text-cache", str(tmp_path / f"cache-{name}"), "--out", str(tmp_path / name),
                     "--save-latents", str(tmp_path / f"{name}.npy")])
        assert code == 0, capsys.readouterr().err
    assert relative_error(np.load(tmp_path / "ckpt.npy"), np.load(tmp_path / "torch.npy")) <= TOL


def test_export_writes_encoders_diffusers_loads(full_ckpt, tiny_pipeline_dir, tiny_sd3_pipe, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "export"
    assert main(["export", str(full_ckpt), str(out)]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    for name in ENCODERS:  # fp32 in, fp32 out: the very tensors of the source
        got, want = getattr(pipe, name).state_dict(), getattr(tiny_sd3_pipe, name).state_dict()
        assert got.keys() == want.keys(), name
        for k in want:
            np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=f"{name} {k}")
    with torch.no_grad():
        kw = {"prompt_2": None, "prompt_3": None, "negative_prompt": "blurry", "device": torch.device("cpu"),
              "max_sequence_length": 24}
        got, want = pipe.encode_prompt(PROMPTS, **kw), tiny_sd3_pipe.encode_prompt(PROMPTS, **kw)
    for g, w in zip(got, want):
        assert relative_error(g.numpy(), w.numpy()) <= TOL

    with pytest.raises(ValueError, match="whose text encoders run in JAX.*customshift export .* --components "
                                         "text_encoders"):  # torch on our checkpoint: refused, naming the way out
        load_text_encoders(full_ckpt, backend="torch")
    assert main(["export", str(full_ckpt), str(tmp_path / "text"), "--components", "text_encoders"]) == 0
    got = TextEncoders.from_pretrained(tmp_path / "text").encode_batch(PROMPTS, max_sequence_length=24)
    want = TextEncoders.from_pretrained(tiny_pipeline_dir).encode_batch(PROMPTS, max_sequence_length=24)
    for g, w in zip(got, want):  # the way out works: the exported encoders alone, in PyTorch, as the source's
        np.testing.assert_array_equal(g, w)

    given = tmp_path / "given"  # --text-encoders DIR still wins: its files, copied
    assert main(["export", str(full_ckpt), str(given), "--text-encoders", str(tiny_pipeline_dir)]) == 0
    for name in ENCODERS:
        assert (given / name / "model.safetensors").read_bytes() == \
            (tiny_pipeline_dir / name / "model.safetensors").read_bytes()


def test_auto_backend_on_a_checkpoint_keeping_transformers_folders():
    """The subject world's shipped model is our checkpoint (transformer, vae) with transformers text-encoder folders
    beside its components: "auto" reads them with torch (as before), and jax reads the same folders."""
    from customshift_jax.text.backends import holds_converted_encoders, load_text_encoders, resolve_text_backend
    from customshift_jax.text.jax.encoders import JaxTextEncoders
    from customshift_jax.toyworld.methods import WEIGHTS

    model = WEIGHTS / "model"
    assert not holds_converted_encoders(model) and resolve_text_backend(model) == "torch"
    ours = load_text_encoders(model, backend="jax")
    assert isinstance(ours, JaxTextEncoders)
    got = ours.encode_batch(["a star on the beach"], max_sequence_length=16)
    want = load_text_encoders(model).encode_batch(["a star on the beach"], max_sequence_length=16)
    for a, b in zip(got, want):
        assert relative_error(np.asarray(a), np.asarray(b)) <= 1e-5
