"""The README's Python example runs as written."""

import ast
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_what_happens_when_lists_the_exit_statuses_and_the_resume_classes():
    from snclr.training.config import RESUME_FREE, RESUME_RECORDED

    text = README.read_text()
    section = text[text.index("## What happens when"):text.index("## Benchmarks")]
    for status in ("**0** done", "**2** refused up front", "**3** training stopped"):
        assert status in section
    hidden = {"stop_after"}
    for name in [*RESUME_FREE, *RESUME_RECORDED]:
        assert name in hidden or f"`{name}`" in section, name
    assert "--allow-config-change" in section


def _layout() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Package layout"):text.index("## Tests")]
    return re.findall(r"^\| `(snclr/[\w/]+\.py)` \|", section, flags=re.M)


def test_package_layout_lists_every_module_and_only_modules_that_exist():
    package = README.parent / "snclr"
    modules = sorted(str(p.relative_to(README.parent)) for p in package.rglob("*.py"))
    assert sorted(_layout()) == modules


def test_package_layout_order_is_the_import_order():
    """Every snclr import, lazy ones included, names a module listed further down."""
    listed = _layout()

    def listed_file(name: str) -> str | None:
        path = name.replace(".", "/")
        for candidate in (f"{path}.py", f"{path}/__init__.py"):
            if candidate in listed:
                return candidate
        return None

    upward = []
    for row, module in enumerate(listed):
        for node in ast.walk(ast.parse((README.parent / module).read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("snclr"):
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("snclr")]
            for name in names:
                target = listed_file(name)
                # A package's own __init__ runs on any import from it; it is not a layer.
                own_package = target is not None and target.endswith("/__init__.py") and \
                    module.startswith(target[: -len("__init__.py")])
                if target not in (None, module) and not own_package and \
                        listed.index(target) < row:
                    upward.append(f"{module} imports {target}")
    assert upward == []
