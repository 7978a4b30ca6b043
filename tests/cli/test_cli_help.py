"""The CLI as users of diffusers expect it: defaults in every help line, --version, the subcommand's own usage
on a bad flag, diffusers' option names as aliases (settings.json: tests/cli/test_generate_cli.py)."""
import pytest

from customshift_jax.cli.main import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("customshift ") and out.split()[1][0].isdigit(), out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--guidance GUIDANCE", "7.0"), ("--seed SEED", "0"), ("--num-images NUM_IMAGES", "1"),
                          ("--shift {cads,concat,joint}", "cads")):
        after = text[text.rindex(flag):][:400]  # the option's line, not the usage
        assert f"default: {default}" in after, (flag, after)


def test_unknown_flag_prints_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", "x", "--bogus-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: customshift generate" in err and "unrecognized arguments: --bogus-flag" in err, err


def test_diffusers_names_are_aliases():
    args = build_parser().parse_args(["generate", "--checkpoint", "x", "--num-inference-steps", "9",
                                      "--guidance-scale", "3.5"])
    assert args.steps == 9 and args.guidance == 3.5
