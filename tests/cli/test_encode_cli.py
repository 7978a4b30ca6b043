"""`customshift encode` writes the --embeds file that `generate` and training samples read."""
import numpy as np
import pytest

from customshift_jax.cli.main import main


def test_encode_writes_what_generate_reads(tiny_pipeline_dir, tmp_path, capsys):
    from customshift_jax.pipeline import load_embeds_file
    from customshift_jax.text import TextEncoders

    (tmp_path / "p.txt").write_text("a dog on the beach\n# a comment\n\na dog in the snow\n")
    out = tmp_path / "dog.npz"
    assert main(["encode", "--text-encoders", str(tiny_pipeline_dir), "--prompts-file", str(tmp_path / "p.txt"),
                 "--subject", "dog", "--max-sequence-length", "16", "--out", str(out)]) == 0
    embeds, subject = load_embeds_file(out, need_subject=True)
    enc = TextEncoders.from_pretrained(tiny_pipeline_dir)
    want = enc.encode(["a dog on the beach", "a dog in the snow"], ["", ""], max_sequence_length=16)
    np.testing.assert_array_equal(embeds.prompt_embeds, want.prompt_embeds)
    np.testing.assert_array_equal(embeds.negative_pooled_prompt_embeds, want.negative_pooled_prompt_embeds)
    s = enc.encode(["dog"], max_sequence_length=16, do_classifier_free_guidance=False)
    np.testing.assert_array_equal(subject[0], s.prompt_embeds)
    assert main(["encode", "--text-encoders", str(tiny_pipeline_dir), "--prompt", "x", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--out", "x.txt", "--prompt", "p"], "ending in .npz"),
    (["--out", "o.npz", "--prompt", "p", "--subject", " "], "--subject is empty"),
    (["--out", "o.npz"], "give exactly one of --prompt"),
])
def test_encode_refusals(tmp_path, capsys, extra, message):
    extra = [str(tmp_path / e) if e.endswith((".npz", ".txt")) else e for e in extra]
    assert main(["encode", "--text-encoders", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
