"""benchmarks/gpu.sh, the one command for the lent GPU machine, as far as a CPU can run it: its arguments,
and the offline install of missing packages from the bundle `make gpu-bundle` gathers (here a
hand-made wheel stands in for the bundle's)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_sh(*args, env=None, **extra):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, **extra)


def fake_wheel(folder: Path, name="selfsupprobe", version="0.1") -> Path:
    """A pure-Python wheel holding `name` (a module defining VALUE = 42)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_help_and_bad_arguments():
    out = gpu_sh("--help")
    assert out.returncode == 0 and "--bundle DIR" in out.stdout and "make gpu-bundle" in out.stdout
    for args, needle in [(["bogus"], "unknown argument 'bogus'"), (["--epochs", "0"], "positive integer"),
                         (["--out"], "--out needs a value")]:
        out = gpu_sh(*args)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr)


def test_check_installs_what_is_missing_from_the_bundle_offline(tmp_path):
    bundle = tmp_path / "bundle"
    fake_wheel(bundle / "wheels")
    fm = tmp_path / "fmnist"
    fm.mkdir()
    (fm / "train-images-idx3-ubyte.gz").write_bytes(b"")
    env = {"SELFSUP_GPU_EXTRA": "selfsupprobe=selfsupprobe", "FMNIST": str(fm), "PIP_NO_INDEX": "1"}
    out = gpu_sh("--check", "--out", str(tmp_path / "out"), "--bundle", str(bundle), "--epochs", "3", "curve", env=env)
    assert out.returncode == 0, out.stderr
    assert "installing from" in out.stdout and "selfsupprobe" in out.stdout and "check: ready" in out.stdout
    assert "figures: curve" in out.stdout and "curve epochs: 3" in out.stdout
    site = tmp_path / "out" / "site"
    probe = subprocess.run([sys.executable, "-c", "import selfsupprobe; print(selfsupprobe.VALUE)"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert probe.stdout.strip() == "42"
    again = gpu_sh("--check", "--out", str(tmp_path / "out"), "--bundle", str(bundle), "curve", env=env)
    assert again.returncode == 0 and "installing" not in again.stdout   # found in the site folder now


@pytest.mark.parametrize("case", ["no-bundle", "no-wheel", "no-data"])
def test_what_is_missing_is_named_with_the_fix(tmp_path, case):
    bundle = tmp_path / "bundle"
    fake_wheel(bundle / "wheels", name="otherprobe")
    extra = "" if case == "no-data" else "selfsupprobe=selfsupprobe"
    env = {"SELFSUP_GPU_EXTRA": extra, "FMNIST": str(tmp_path / "nowhere"), "PIP_NO_INDEX": "1"}
    where = str(tmp_path / "none") if case == "no-bundle" else str(bundle)
    out = gpu_sh("--check", "--out", str(tmp_path / "out"), "--bundle", where, "throughput", env=env)
    assert out.returncode == 2
    needle = {"no-bundle": "no wheels in", "no-wheel": "could not install selfsupprobe",
              "no-data": "no Fashion-MNIST in"}[case]
    assert needle in out.stderr and ("make gpu-bundle" in out.stderr or "FMNIST=DIR" in out.stderr)
