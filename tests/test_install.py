"""Install robustness (reliability review D13): a failed or foreign CMake configure cached in the build
directory must not poison later builds, a missing extension is announced at install time, and running
without it warns once per process."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import ringattn
from ringattn import _extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's helpers, imported without running setup() (it runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("ringattn_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fingerprint(setup_py, **env):
    return setup_py.toolchain_fingerprint(shutil.which("cmake") or "cmake", "Ninja", False, env=env)


def _cache(build_dir: Path, cxx: str) -> None:
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "CMakeCache.txt").write_text(
        f"CMAKE_CXX_COMPILER:FILEPATH={cxx}\nCMAKE_BUILD_TYPE:STRING=Release\n"
    )


def test_fingerprint_follows_the_compiler_and_the_first_configure_environment(setup_py):
    plain = _fingerprint(setup_py)
    assert _fingerprint(setup_py) == plain
    assert _fingerprint(setup_py, CXX="/bin/false") != plain
    assert _fingerprint(setup_py, CXXFLAGS="-O0") != plain


def test_poisoned_cache_is_detected(setup_py, tmp_path):
    """The review's reproducer: CXX=/bin/false left CMAKE_CXX_COMPILER=/bin/false in the cache."""
    good = _fingerprint(setup_py)
    build = tmp_path / "cmake"
    assert setup_py.stale_build_reason(build, good) == ""  # nothing there yet
    _cache(build, "/bin/false")
    assert "no toolchain record" in setup_py.stale_build_reason(build, good)  # a cache from before the record
    setup_py._write_record(build, _fingerprint(setup_py, CXX="/bin/false"), configured=False)
    assert "previous CMake configure there failed" in setup_py.stale_build_reason(build, good)
    setup_py._write_record(build, _fingerprint(setup_py, CXX="/bin/false"), configured=True)
    reason = setup_py.stale_build_reason(build, good)
    assert "toolchain changed" in reason and "/bin/false" in reason
    setup_py._write_record(build, good, configured=True)
    _cache(build, str(tmp_path / "gone" / "c++"))
    assert "not an executable" in setup_py.stale_build_reason(build, good)
    _cache(build, shutil.which("sh"))
    assert setup_py.stale_build_reason(build, good) == ""  # same toolchain, configured: reuse it


# A stand-in for cmake that caches the compiler of its first configure exactly as CMake does (the
# environment's CXX is read only when there is no cache), so the real CMakeBuild runs end to end.
FAKE_CMAKE = """\
#!{python}
import os, shutil, sys, sysconfig
from pathlib import Path

args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("cmake version 3.99.0-fake")
    sys.exit(0)
cache = Path("CMakeCache.txt")
entries = dict(line.split("=", 1) for line in cache.read_text().splitlines()) if cache.exists() else {{}}
if args[:1] == ["--build"]:
    out = Path(entries["CMAKE_LIBRARY_OUTPUT_DIRECTORY:PATH"]) / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    out.write_bytes(b"")
    sys.exit(0)
defines = dict(a[2:].split("=", 1) for a in args if a.startswith("-D"))
cxx = entries.get("CMAKE_CXX_COMPILER:FILEPATH") or shutil.which(os.environ.get("CXX", "c++"))
entries["CMAKE_CXX_COMPILER:FILEPATH"] = cxx
entries["CMAKE_LIBRARY_OUTPUT_DIRECTORY:PATH"] = defines["CMAKE_LIBRARY_OUTPUT_DIRECTORY"]
cache.write_text("".join(f"{{k}}={{v}}\\n" for k, v in entries.items()))
if os.path.basename(cxx) == "false":
    print(f"CMake Error: The C++ compiler {{cxx}} is not able to compile a simple test program.")
    sys.exit(1)
"""


def _build(setup_py, tmp_path: Path) -> dict:
    """One ``build_ext`` of the extension with setup.py's CMakeBuild into tmp_path; its status."""
    from setuptools import Distribution

    dist = Distribution({"ext_modules": [setup_py.CMakeExtension("ringattn._C")], "script_name": "setup.py"})
    cmd = setup_py.CMakeBuild(dist)
    cmd.initialize_options()
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    cmd.finalize_options()
    cmd.run()
    return json.loads((tmp_path / "lib" / "ringattn" / "_C_status.json").read_text())


@pytest.fixture
def fake_toolchain(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cmake = bin_dir / "cmake"
    cmake.write_text(FAKE_CMAKE.format(python=sys.executable))
    cmake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in ("RINGATTN_SKIP_EXT", "RINGATTN_REQUIRE_EXT", "CXX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RINGATTN_DISABLE_CUDA", "1")
    monkeypatch.setitem(sys.modules, "pybind11", types.SimpleNamespace(get_cmake_dir=lambda: str(tmp_path)))
    return tmp_path


def test_a_failed_configure_does_not_poison_the_next_build(setup_py, fake_toolchain, monkeypatch, capfd):
    monkeypatch.setenv("CXX", "/bin/false")
    status = _build(setup_py, fake_toolchain)
    assert not status["built"] and "/bin/false" in status["reason"]
    err = capfd.readouterr().err
    assert "ringattn._C was NOT built" in err and "/bin/false" in err  # said at install time, not buried

    monkeypatch.delenv("CXX")  # a working compiler now
    status = _build(setup_py, fake_toolchain)
    assert status["built"], status["reason"]
    err = capfd.readouterr().err
    assert "configuring from scratch" in err and "NOT built" not in err

    status = _build(setup_py, fake_toolchain)  # an unchanged toolchain reuses the build directory
    assert status["built"] and "configuring from scratch" not in capfd.readouterr().err


def test_require_ext_fails_the_install(setup_py, fake_toolchain, monkeypatch):
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("RINGATTN_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="RINGATTN_REQUIRE_EXT"):
        _build(setup_py, fake_toolchain)


def test_missing_extension_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(_extension, "_load", lambda: (None, ImportError("simulated: no _C")))
    monkeypatch.setattr(_extension, "_warned", False)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ringattn.flash_attn_func(q, k, v, causal=True)
        ringattn.flash_attn_func(q, k, v, causal=True)
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning) and "ringattn._C" in str(w.message)]
    assert len(slow) == 1, [str(w.message) for w in caught]
    reason = _extension.extension_status()["reason"].splitlines()[0]  # the recorded or the import error
    assert "reference backend" in str(slow[0].message) and reason in str(slow[0].message)
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_pip_install_after_a_failed_one_builds_the_extension(tmp_path):
    """The review's reproducer with real pip and CMake (minutes): CXX=/bin/false, then a working
    compiler, both installing from the same source tree (so the same in-tree build/ directory)."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    shutil.copy2(ROOT / "setup.py", src / "setup.py")  # the working copy's
    env = {**os.environ, "RINGATTN_DISABLE_CUDA": "1", "RINGATTN_CPU_MARCH": ""}

    def install(target, **extra):
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(src)]
        done = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads((target / "ringattn" / "_C_status.json").read_text())

    assert not install(tmp_path / "bad", CXX="/bin/false")["built"]
    status = install(tmp_path / "good")
    assert status["built"], status["reason"]
    assert list((tmp_path / "good" / "ringattn").glob("_C*.so"))


def test_build_records_its_cpu_march_override(setup_py):
    """None: the portable build (every ISA variant, chosen at run time); a value: RINGATTN_CPU_MARCH's
    single -march variant ("" for the compiler's default flags)."""
    assert setup_py.cpu_march({}) is None
    assert setup_py.cpu_march({"RINGATTN_CPU_MARCH": ""}) == ""
    assert setup_py.cpu_march({"RINGATTN_CPU_MARCH": "native"}) == "native"
