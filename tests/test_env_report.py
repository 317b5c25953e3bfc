"""`python -m ringattn`, the environment report for bug reports: it names versions, the extension's state
and CPU ISA, every backend's can_implement reason per device, and the distributed backends; it works
without a GPU, without the extension and without transformers."""

import json
import os
import subprocess
import sys
import warnings

import torch
import torch.distributed as dist

from ringattn import env_report
from ringattn.backends import BACKENDS
from ringattn.block import BlockMask, block_args
from ringattn.rope import RoPEConfig

# Runs the report in a fresh interpreter with modules hidden (None in sys.modules makes their import fail).
HIDE_AND_RUN = """
import runpy, sys
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None
sys.argv = ["ringattn", *sys.argv[2:]]
runpy.run_module("ringattn", run_name="__main__", alter_sys=True)
"""


def _report(*args, hide=""):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even where there is one
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", HIDE_AND_RUN, hide, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def _cpu_reason(name: str, dtype: torch.dtype) -> str:
    """What the backend itself says about the representative block (asked directly, not via the report)."""
    s = env_report.REPRESENTATIVE
    q = torch.zeros(s["B"], s["S"], s["Hq"], s["D"], dtype=dtype)
    k = v = torch.zeros(s["B"], s["S"], s["Hkv"], s["D"], dtype=dtype)
    args = block_args(q, k, v, BlockMask(causal=True), rope=RoPEConfig(s["D"], theta=s["rope_theta"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BACKENDS[name].can_implement(q, k, v, args)


def test_report_names_versions_backends_reasons_and_distributed():
    info = env_report.collect()
    text = env_report.format_report(info)
    assert torch.__version__ in text and sys.version.split()[0] in text
    cpu = info["devices"][0]
    assert cpu["device"] == "cpu"
    for dtype in (torch.float32, torch.bfloat16):
        verdicts = cpu["backends"][str(dtype).removeprefix("torch.")]
        assert set(verdicts) == {"auto", *BACKENDS}
        for name in BACKENDS:
            ok, reason = _cpu_reason(name, dtype)
            if ok:
                assert verdicts[name] == "ok", (name, verdicts[name])
            else:
                assert verdicts[name].startswith("no: ") and reason in verdicts[name], (name, verdicts[name])
                assert reason in text
    expected_gloo = "yes" if dist.is_available() and dist.is_gloo_available() else "no"
    assert any(line.split() == ["gloo", expected_gloo] for line in text.splitlines())


def test_report_runs_without_extension_transformers_or_gpu():
    done = _report(hide="ringattn._C,transformers")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    lines = {line.split(None, 1)[0]: line for line in out.splitlines() if line.strip()}
    assert "not installed" in lines["transformers"]
    assert "no: " in lines["available"]  # the extension, with the reason it is missing
    assert "no CUDA device visible" in out
    # without ringattn._C the compiled cpu backend declines and auto falls back to the fp64 reference
    assert "auto       -> reference" in out
    cpu_line = next(line for line in out.splitlines() if line.split()[:1] == ["cpu"] and "no: " in line)
    assert "ringattn._C" in cpu_line or "extension" in cpu_line
    assert "Traceback" not in done.stderr


def test_report_json_has_every_section(capsys):
    assert env_report.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"versions", "extension", "devices", "distributed", "representative_block"} <= info.keys()
    assert info["versions"]["torch"] == torch.__version__
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert [d["device"] for d in info["devices"]] == ["cpu", *cuda]


def test_a_failing_section_is_reported_not_raised(monkeypatch):
    def broken():
        raise RuntimeError("simulated probe failure")

    monkeypatch.setattr(env_report, "distributed", broken)
    info = env_report.collect()
    assert "simulated probe failure" in info["distributed"]["error"]
    assert "simulated probe failure" in env_report.format_report(info)


def test_report_names_the_cpu_variant_and_warns_when_none_runs_here(monkeypatch):
    import ringattn._extension as ext

    real = ext.extension_status
    variants = {"generic": {"isa": [], "missing": []}, "avx2": {"isa": ["avx", "avx2"], "missing": []}}

    def status(**over):
        return {**real(), "available": True, "cpu_march": None, "cpu_variants": variants, **over}

    monkeypatch.setattr(ext, "extension_status", lambda: status(cpu_variant="avx2", cpu_isa=["avx", "avx2"]))
    monkeypatch.setenv("RINGATTN_CPU_ISA", "generic")
    text = env_report.format_report(env_report.collect())
    assert "generic avx2 (portable build)" in text and "avx2: avx avx2" in text
    assert "generic (forces this variant)" in text and "WARNING" not in text

    lacking = {"znver9": {"isa": ["avx512f"], "missing": ["made_up_isa"]}}
    monkeypatch.setattr(
        ext, "extension_status", lambda: status(cpu_march="znver9", cpu_variants=lacking, cpu_variant=None)
    )
    text = env_report.format_report(env_report.collect())
    assert "znver9 (-march=znver9)" in text
    assert "WARNING" in text and "lacks made_up_isa" in text


def test_check_fails_a_wrong_backend_and_sets_the_exit_status(monkeypatch, capsys):
    class OffByOnePercent:
        name = "broken"
        features = frozenset()

        def can_implement(self, *args):
            return True, ""

        def forward(self, *args, **kwargs):
            out, lse = BACKENDS["reference"].forward(*args, **kwargs)
            return out * 1.01, lse

        def backward(self, *args, **kwargs):
            return BACKENDS["reference"].backward(*args, **kwargs)

    monkeypatch.setitem(BACKENDS, "broken", OffByOnePercent())
    monkeypatch.setattr(env_report, "DTYPES", {"cpu": (torch.float32,)})
    rows = env_report.check(["cpu"], backends=["reference", "broken"])
    verdicts = {r["backend"]: r["verdict"] for r in rows if r["tensor"] == "out" or "n/a" in r["verdict"]}
    assert verdicts["reference"] == "PASS" and verdicts["broken"] == "FAIL"
    text = env_report.format_check(rows)
    assert any(line.split()[2:4] == ["broken", "FAIL"] for line in text.splitlines()[1:])
    assert any(line.split()[2:4] == ["reference", "PASS"] for line in text.splitlines()[1:])
    monkeypatch.setattr(env_report, "check", lambda: rows)
    assert env_report.main(["--check"]) == 1
    assert "FAIL" in capsys.readouterr().out
