"""Builds the optional torch-free extension ringattn._C with CMake + ninja + pybind11.

Environment:
  RINGATTN_SKIP_EXT=1        install pure Python, no extension
  RINGATTN_CUDA_ARCHS=80;89  CUDA SM archs (default 80;86;89;90); CUDA only where nvcc is found
  RINGATTN_DISABLE_CUDA=1    build the CPU part of the extension only
  RINGATTN_CPU_MARCH=x86-64-v3  -march of the CPU kernels (default native)
  MAX_JOBS=N                 parallel compile jobs (default: number of CPUs)

If the extension cannot be built the install still succeeds; the reason is stored next to the
package as _C_status.json and reported by ringattn.extension_status().
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
                print(f"ringattn: extension not built ({exc}); installing pure Python", file=sys.stderr)
        status["build_seconds"] = round(time.monotonic() - started, 1)
        Path(self._status_path(ext)).write_text(json.dumps(status, indent=1) + "\n")

    def _cmake_build(self, target):
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("RINGATTN_CUDA_ARCHS", "80;86;89;90")
        with_cuda = os.environ.get("RINGATTN_DISABLE_CUDA") != "1" and shutil.which("nvcc") is not None
        configure = [
            cmake,
            str(ROOT),
            "-G",
            "Ninja" if shutil.which("ninja") else "Unix Makefiles",
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
        with log.open("w") as out:
            for cmd in (configure, [cmake, "--build", ".", "--parallel", jobs]):
                if subprocess.run(cmd, cwd=build_dir, stdout=out, stderr=subprocess.STDOUT).returncode:
                    tail = log.read_text().strip().splitlines()[-15:]
                    raise RuntimeError(f"`{' '.join(cmd[:2])} ...` failed; log tail:\n" + "\n".join(tail))
        if not target.exists():
            raise RuntimeError(f"CMake finished but {target.name} was not produced")
        return {"cuda": with_cuda, "cuda_archs": archs if with_cuda else ""}


setup(ext_modules=[CMakeExtension("ringattn._C")], cmdclass={"build_ext": CMakeBuild})
