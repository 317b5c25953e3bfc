"""The smoke test of an installed ringattn (run by .ci/sdist_smoke.sh with the fresh virtualenv's
python, from a folder outside the repository): the package imported is the installed one, it built
its extension, the environment report runs, and every backend that can run here passes one small
attention call against the fp64 reference."""

import importlib.metadata
import sys
from pathlib import Path

import ringattn
from ringattn import env_report

repo = Path(__file__).resolve().parents[1]
where = Path(ringattn.__file__).resolve()
assert repo not in where.parents, f"imported the source tree ({where}), not the installed package"
assert ringattn.__version__ == importlib.metadata.version("ringattn"), ringattn.__version__

status = ringattn.extension_status()
print("extension_status():", status)
assert status["available"], f"the install did not build ringattn._C: {status['reason']}"
assert status["cpu_variant"] is not None, (
    f"no compiled CPU kernel variant runs here: {status['cpu_variants']}"
)

info = env_report.collect()
text = env_report.format_report(info)
print(text)
for section in ("versions", "extension", "devices", "distributed"):
    assert "error" not in info[section], (section, info[section])
assert "gloo" in text and "auto" in text

rows = env_report.check()
print(env_report.format_check(rows))
verdicts = {(r["dtype"], r["backend"]): set() for r in rows if r["device"] == "cpu"}
for r in rows:
    if r["device"] == "cpu":
        verdicts[(r["dtype"], r["backend"])].add(r["verdict"].split(":")[0])
failed = [r for r in rows if r["verdict"] == "FAIL"]
assert not failed, failed
for dtype in (
    "float32",
    "bfloat16",
    "float16",
):  # the compiled CPU backend and the fp64 spec run on every CPU
    for backend in ("cpu", "reference"):
        assert verdicts[(dtype, backend)] == {"PASS"}, (dtype, backend, verdicts[(dtype, backend)])
print(f"smoke: ringattn {ringattn.__version__} from {where.parent}: OK")
sys.exit(0)
