"""The wheel holds the whole library: every tracked module of forkkv_hf/ (subpackages included) and of
forkkv_kernels/, the ``py.typed`` marker, and the version of ``forkkv_hf.__version__`` (its one source)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import forkkv_hf

pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def _tracked(*paths) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout: the wheel is built from the tracked files")
    return out.stdout.split()


def test_wheel_holds_every_module_the_marker_and_the_version(tmp_path):
    files = _tracked("pyproject.toml", "README.md", "forkkv_hf", "forkkv_kernels")
    src = tmp_path / "src"
    for f in files:  # a copy of the tracked tree: the build writes build/ and *.egg-info where it runs
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, src / f)
    build = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; print(build_meta.build_wheel("
                            f"{str(tmp_path / 'dist')!r}))"], cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = tmp_path / "dist" / build.stdout.split()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f for f in files if f.startswith(("forkkv_hf/", "forkkv_kernels/")) and f.endswith(".py")}
    assert want - names == set(), "add the missing packages to [tool.setuptools] packages in pyproject.toml"
    assert "forkkv_hf/py.typed" in names
    assert wheel.name.startswith(f"forkkv_hf-{forkkv_hf.__version__}-")
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert f"\nVersion: {forkkv_hf.__version__}\n" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_no_top_level_folder_shadows_an_installed_package():
    """The repository root is on the import path in the tests, ``python -m eval...`` and the examples: a top-level
    package folder named like an installed distribution's module shadows it there (``kernels/`` did, once transformers
    5.25 began to import Hugging Face's ``kernels`` package: ``import transformers`` failed from the root)."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert {"forkkv_hf", "forkkv_kernels", "eval"} <= ours
    clashes = {name: owners[name] for name in ours if set(owners.get(name, [])) - {"forkkv-hf", "forkkv_hf"}}
    assert clashes == {}, f"rename these folders: installed distributions provide modules of the same name: {clashes}"


def test_layering_reads_the_kernel_package_too(tmp_path):
    """The design card's layering tool (``../shared/tools/layering.py``: import circles, modules over 450 lines) reads
    the kernels from a ``kernels/`` folder, which became ``forkkv_kernels/`` (above): run from the repository root it
    skips them without a word. Run over a view of the tree where ``kernels`` is that folder, it must find nothing."""
    tool = ROOT.parent / "shared" / "tools" / "layering.py"
    if not tool.exists():
        pytest.skip("the design card's tools are not beside this checkout")
    for name, target in (("forkkv_hf", "forkkv_hf"), ("kernels", "forkkv_kernels"), ("eval", "eval"),
                         ("examples", "examples")):
        (tmp_path / name).symlink_to(ROOT / target, target_is_directory=True)
    proc = subprocess.run([sys.executable, str(tool)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "forkkv_kernels" not in proc.stdout and "nothing found" in proc.stdout, proc.stdout[-3000:]
