"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_what_happens_when_lists_the_exit_statuses_and_the_resume_classes():
    from snclr.config import RESUME_FREE, RESUME_RECORDED

    text = README.read_text()
    section = text[text.index("## What happens when"):text.index("## Benchmarks")]
    for status in ("**0** done", "**2** refused up front", "**3** training stopped"):
        assert status in section
    hidden = {"stop_after"}
    for name in [*RESUME_FREE, *RESUME_RECORDED]:
        assert name in hidden or f"`{name}`" in section, name
    assert "--allow-config-change" in section
