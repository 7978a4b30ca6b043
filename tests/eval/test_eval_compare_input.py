"""`customshift eval --compare` on files that are not results: one line naming the file (issue 26, "Also")."""
import pytest

from customshift_jax.cli.main import main


@pytest.mark.parametrize("content, says", [("{bad json", "is not JSON"), ("[1]", "is not a `customshift eval` result")])
def test_compare_names_a_file_that_is_not_a_result(tmp_path, capsys, content, says):
    bad = tmp_path / "scores.json"
    bad.write_text(content)
    assert main(["eval", "--compare", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --compare {bad} ") and says in err and "\n" not in err, err


def test_compare_names_a_device(capsys):
    assert main(["eval", "--compare", "/dev/zero", "/dev/zero"]) == 2
    assert "--compare /dev/zero is a device, not a regular file" in capsys.readouterr().err
