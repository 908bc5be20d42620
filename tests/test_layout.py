"""The two layers: the library imports nothing from the program, and installs as a package
whose sdist carries its own tests."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for p in sorted((ROOT / "snclr").rglob("*.py"))
           if "training" not in p.relative_to(ROOT / "snclr").parts and p.name != "__main__.py"]
PROGRAM_ONLY = ("torchvision", "timm", "yaml", "tqdm", "matplotlib", "PIL", "numpy")


def _run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, check=False)


def _imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_module_imports_nothing_from_the_program(path):
    assert not [n for n in _imported_names(path) if n.startswith("snclr.training")]


def test_importing_the_ops_loads_no_program_module_and_no_program_dependency():
    # torch itself may import numpy or tqdm; only what snclr adds counts.
    done = _run("import sys, torch\nbefore = set(sys.modules)\nimport snclr.ops\n"
                "print(sorted(m for m in sys.modules if m.startswith('snclr.')))\n"
                f"print(sorted(m for m in {PROGRAM_ONLY!r} if m in set(sys.modules) - before))")
    assert done.returncode == 0, done.stderr
    modules, dependencies = (eval(line) for line in done.stdout.splitlines())
    assert dependencies == []
    assert all(m.startswith(("snclr.ops", "snclr.kernels", "snclr.reference")) for m in modules), \
        modules


def test_the_top_level_api_imports_without_the_program_dependencies():
    # numpy and tqdm stay: torch and triton use them themselves.
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in PROGRAM_ONLY
                      if name not in ("numpy", "tqdm"))
    done = _run(f"import sys\n{blocked}import snclr, torch\n"
                "model = snclr.create_model('small_cnn', in_chans=1, img_size=28, "
                "num_neighbors=2, queue_size=16, projector_hidden=16, projector_dim=8, "
                "predictor_hidden=16)\n"
                "out = model(torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28))\n"
                "print(out.loss.dim())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_the_command_without_its_extras_says_what_to_install():
    done = _run("import sys\nsys.modules['yaml'] = None\nsys.modules['timm'] = None\n"
                "from snclr.training import main\nsys.exit(main(['pretrain', '--help']))")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "missing: timm, yaml" in lines[0] and "pip install 'snclr[train]'" in lines[0]


def test_sdist_carries_license_types_and_tests_that_collect(tmp_path):
    build = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                            "--outdir", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (sdist,) = tmp_path.glob("snclr-*.tar.gz")
    twine = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert twine.returncode == 0, twine.stdout + twine.stderr
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    (tree,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in ("LICENSE", "snclr/py.typed", "tests/conftest.py", "bench/harness.py"):
        assert (tree / name).is_file(), name
    # The extracted tree's own package and tests, not this checkout's.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "-p", "no:cacheprovider", "tests"], cwd=tree, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-2000:]
    assert " error" not in collect.stdout.splitlines()[-1]
