"""Packaging: the version comes from the package metadata, the package is typed (py.typed, hints on the
public API), the installed commands point at real functions, and the sdist carries what the extension's
build needs (slow: it builds one; CI's `make sdist-smoke` installs it into a fresh virtualenv)."""

import importlib
import importlib.metadata
import inspect
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import ringattn

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the module's other tests need it too)
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_the_installed_metadata_with_a_fallback(monkeypatch):
    assert ringattn.__version__ == importlib.metadata.version("ringattn")
    assert ringattn.__version__ == PYPROJECT["project"]["version"]

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert ringattn._version() == "0+unknown"


def test_py_typed_ships_with_the_package():
    assert (Path(ringattn.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["ringattn"]


def test_console_scripts_point_at_main_functions():
    scripts = PYPROJECT["project"]["scripts"]
    assert {"ringattn-bench", "ringattn-topology"} <= scripts.keys()
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        assert callable(fn) and "argv" in inspect.signature(fn).parameters, name


def _public_callables():
    for name in ringattn.__all__:
        obj = getattr(ringattn, name)
        if inspect.ismodule(obj) or not callable(obj):
            continue
        yield pytest.param(name, obj, id=name)


def _unannotated(fn) -> list[str]:
    sig = inspect.signature(inspect.unwrap(fn))
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
    ]
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append("return")
    return missing


@pytest.mark.parametrize(("name", "obj"), list(_public_callables()))
def test_public_api_has_type_hints(name, obj):
    if inspect.isclass(obj):
        methods = [obj.__init__] + [
            f for n, f in vars(obj).items() if inspect.isfunction(f) and not n.startswith("_")
        ]
        missing = {f.__qualname__: _unannotated(f) for f in methods}
    else:
        missing = {name: _unannotated(obj)}
    assert not any(missing.values()), missing


@pytest.mark.slow
def test_sdist_carries_the_extension_sources(tmp_path):
    """`python -m build --sdist` from a clean copy of the tracked files: csrc/, CMakeLists.txt, setup.py
    and every package are in it; no build output of the source tree is."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tracked = [name for name in files.split() if (ROOT / name).is_file()]
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    (src / "ringattn" / "_C_status.json").write_text("{}")  # a stale build record must not travel
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("ringattn-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {
        n for n in tracked if n.startswith(("csrc/", "ringattn/", "tritonkernels/")) and n.endswith(".py")
    }
    needed |= {n for n in tracked if n.startswith("csrc/")}
    needed |= {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "ringattn/py.typed"}
    assert needed <= names, sorted(needed - names)
    assert "ringattn/_C_status.json" not in names and not any(n.endswith(".so") for n in names)
