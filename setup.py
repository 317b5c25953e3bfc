"""Builds the optional torch-free extension ringattn._C with CMake + ninja + pybind11.

Environment:
  RINGATTN_SKIP_EXT=1        install pure Python, no extension
  RINGATTN_REQUIRE_EXT=1     fail the install when the extension cannot be built (CI)
  RINGATTN_CUDA_ARCHS=80;89  CUDA SM archs (default 80;86;89;90); CUDA only where nvcc is found
  RINGATTN_DISABLE_CUDA=1    build the CPU part of the extension only
  RINGATTN_CPU_MARCH=native  override: the CPU kernels built once with -march=<value> (empty: the
                             compiler's default flags) instead of the portable build, which carries one
                             variant per x86-64 ISA level and picks the CPU's best at run time
  MAX_JOBS=N                 parallel compile jobs (default: number of CPUs)

If the extension cannot be built the install still succeeds; the reason is stored next to the
package as _C_status.json, reported by ringattn.extension_status(), printed as a banner at install
time (pip shows a build's output only with -v, so the banner also goes to the terminal when there is
one), and ringattn warns once per process when it runs without the extension.

The CMake build directory is reused between installs (pip builds in-tree, in build/). CMake caches
the compiler and flags it found at the first configure, so a configure that failed, or one made with
another toolchain, would poison every later build: the build directory records the toolchain it was
configured with (TOOLCHAIN_FILE) and is wiped before configuring when that record is missing,
says the configure failed, or differs from the current toolchain (``stale_build_reason``).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
STATUS_FILE = "_C_status.json"
TOOLCHAIN_FILE = "ringattn_toolchain.json"
# Read by CMake from the environment at the first configure only, then kept in its cache.
CACHED_ENV = ("CXX", "CXXFLAGS", "LDFLAGS", "CUDACXX", "CUDAFLAGS", "CUDAHOSTCXX", "CMAKE_GENERATOR")
CXX_CANDIDATES = ("c++", "g++", "clang++")  # CMake's search order when CXX is unset (first found)


def _first_line(cmd: list[str]) -> str:
    """The first line a tool prints for ``--version``; "" when it cannot run."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else ""


def _resolve(program: str | None) -> str:
    """A program (a name or a path, possibly with arguments as in CXX="ccache g++") as a real path."""
    if not program:
        return ""
    found = shutil.which(program.split()[0])
    return os.path.realpath(found) if found else program


def toolchain_fingerprint(cmake: str, generator: str, with_cuda: bool, env=None) -> dict:
    """What a CMake cache silently depends on: the tools, their versions and the environment CMake
    reads only at the first configure. Two builds may share a cache only when these are equal."""
    env = os.environ if env is None else env
    cxx = env.get("CXX") or next((c for c in CXX_CANDIDATES if shutil.which(c)), "")
    nvcc = shutil.which("nvcc") if with_cuda else None
    return {
        "cmake": _first_line([cmake, "--version"]),
        "generator": generator,
        "python": sys.executable,
        "cxx": _resolve(cxx),
        "cxx_version": _first_line([*cxx.split(), "--version"]) if cxx else "",
        "nvcc": _resolve(nvcc),
        "nvcc_version": _first_line([nvcc, "--version"]) if nvcc else "",
        "env": {name: env.get(name, "") for name in CACHED_ENV},
    }


def _cached_cxx(cache: Path) -> str:
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_CXX_COMPILER:"):
            return line.split("=", 1)[1].strip()
    return ""


def stale_build_reason(build_dir: Path, fingerprint: dict) -> str:
    """Why ``build_dir`` must be wiped before configuring ("" when it can be reused)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return ""
    record_path = build_dir / TOOLCHAIN_FILE
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return "its CMake cache has no toolchain record (an older or interrupted configure)"
    if not record.get("configured"):
        return "the previous CMake configure there failed"
    if record.get("toolchain") != fingerprint:
        old, new = record.get("toolchain") or {}, fingerprint
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return (
            "the toolchain changed ("
            + "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            + ")"
        )
    cxx = _cached_cxx(cache)
    if os.path.isabs(cxx) and not os.access(cxx, os.X_OK):
        return f"its cached C++ compiler {cxx} is not an executable"
    return ""


def _write_record(build_dir: Path, fingerprint: dict, configured: bool) -> None:
    (build_dir / TOOLCHAIN_FILE).write_text(
        json.dumps({"toolchain": fingerprint, "configured": configured}, indent=1) + "\n"
    )


def cpu_march(env=None) -> str | None:
    """The RINGATTN_CPU_MARCH override CMakeLists.txt builds the CPU kernels with ("" : the compiler's
    default flags), None for the portable build (one variant per ISA level, chosen at run time)."""
    env = os.environ if env is None else env
    return env.get("RINGATTN_CPU_MARCH")


def announce(message: str) -> None:
    """A message the user sees at install time: stderr, and the terminal when pip captures stderr."""
    bar = "=" * 78
    text = f"\n{bar}\n{message}\n{bar}\n"
    print(text, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:  # pip hides a successful build's output unless -v
            tty.write(text)
    except OSError:
        pass


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        for ext in self.extensions:
            self._build_optional(ext)

    def get_outputs(self):
        outputs = [self.get_ext_fullpath(ext.name) for ext in self.extensions]
        outputs = [p for p in outputs if os.path.exists(p)]
        return outputs + [self._status_path(ext) for ext in self.extensions]

    def _status_path(self, ext):
        return os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), STATUS_FILE)

    def _build_optional(self, ext):
        started = time.monotonic()
        status = {"built": False, "cuda": False, "cuda_archs": "", "reason": ""}
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a stale module from an earlier build must not outlive a skip
        if os.environ.get("RINGATTN_SKIP_EXT") == "1":
            status["reason"] = "skipped: RINGATTN_SKIP_EXT=1 at install time"
        else:
            try:
                status.update(self._cmake_build(target))
                status["built"] = True
            except Exception as exc:  # the package must install even when the toolchain is missing
                status["reason"] = f"build failed: {exc}"
        status["build_seconds"] = round(time.monotonic() - started, 1)
        Path(self._status_path(ext)).write_text(json.dumps(status, indent=1) + "\n")
        if not status["built"]:
            message = (
                f"ringattn: the compiled extension ringattn._C was NOT built; installing pure Python.\n"
                f"Reason: {status['reason']}\n"
                "CPU attention in fp32/bf16/fp16 will run on the slow fp64 reference backend. Fix the toolchain\n"
                "(cmake, ninja, a C++17 compiler) and reinstall; ringattn.extension_status() repeats this."
            )
            if os.environ.get("RINGATTN_REQUIRE_EXT") == "1" and os.environ.get("RINGATTN_SKIP_EXT") != "1":
                raise RuntimeError(message + "\n(RINGATTN_REQUIRE_EXT=1: failing the install)")
            announce(message)

    def _cmake_build(self, target):
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
        with_cuda = os.environ.get("RINGATTN_DISABLE_CUDA") != "1" and shutil.which("nvcc") is not None
        fingerprint = toolchain_fingerprint(cmake, generator, with_cuda)
        stale = stale_build_reason(build_dir, fingerprint)
        if stale:
            print(f"ringattn: configuring from scratch: {build_dir} is stale: {stale}", file=sys.stderr)
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("RINGATTN_CUDA_ARCHS", "80;86;89;90")
        configure = [
            cmake,
            str(ROOT),
            "-G",
            generator,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent.resolve()}",
            f"-DRINGATTN_CUDA_ARCHS={archs}",
            f"-DRINGATTN_ENABLE_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            configure.append(f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        log = build_dir / "build.log"
        _write_record(build_dir, fingerprint, configured=False)  # stays so if configure fails
        with log.open("w") as out:
            for step, cmd in (
                ("configure", configure),
                ("build", [cmake, "--build", ".", "--parallel", jobs]),
            ):
                if subprocess.run(cmd, cwd=build_dir, stdout=out, stderr=subprocess.STDOUT).returncode:
                    tail = log.read_text().strip().splitlines()[-15:]
                    raise RuntimeError(f"`{' '.join(cmd[:2])} ...` failed; log tail:\n" + "\n".join(tail))
                if step == "configure":
                    _write_record(build_dir, fingerprint, configured=True)
        if not target.exists():
            raise RuntimeError(f"CMake finished but {target.name} was not produced")
        text = (
            subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout if with_cuda else ""
        )
        release = next((line.strip() for line in text.splitlines() if "release" in line), "")
        return {
            "cuda": with_cuda,
            "cuda_archs": archs if with_cuda else "",
            "nvcc_version": release,
            "cpu_march": cpu_march(),
        }


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    setup(ext_modules=[CMakeExtension("ringattn._C")], cmdclass={"build_ext": CMakeBuild})
