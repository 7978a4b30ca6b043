"""README's Python code runs as written (on the tiny pipeline where it names /tmp/tiny-sd3), so README cannot rot."""
import re
from pathlib import Path

import numpy as np
from fixtures_pipeline import tiny_pipeline_dir  # noqa: F401

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run(tiny_pipeline_dir):  # noqa: F811
    blocks = python_blocks()
    assert blocks, "README has no python block"
    for code in blocks:
        scope: dict = {}
        exec(compile(code.replace("/tmp/tiny-sd3", str(tiny_pipeline_dir)), "README.md", "exec"), scope)
        if "sample" in scope:
            assert np.all(np.isfinite(np.asarray(scope["sample"]))), "README's sample is not finite"
