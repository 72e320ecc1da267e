"""The C++-only tests and fuzz targets, under AddressSanitizer and UBSan.

Configures a fresh build of tests/native/*_test.cc and tests/fuzz in a
temporary directory, runs every native test, then each fuzz target over its
seeds (tests/fuzz/seeds) for a fixed number of mutations from a fixed RNG seed,
so a failure reproduces with the command in its message. Any non-zero exit or
sanitizer report fails. Skipped when cmake, ninja or a C++ compiler with the
sanitizer runtimes is missing; Python and pybind11 are not involved.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FUZZ = ROOT / "tests" / "fuzz"
NATIVE_TESTS = sorted(p.stem for p in (ROOT / "tests" / "native").glob("*_test.cc"))
FUZZ_TARGETS = {  # target: (seed directory, dictionary)
    "fuzz_pickle_vm": ("pickle", "pickle.dict"),
    "fuzz_zip_index": ("zip", "zip.dict"),
}
FUZZ_RUNS = 100_000  # a few seconds per target on one core of this -O1 build
TIMEOUT_S = 600

# Reports must end the program (UBSan would print and go on), and leaks count.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
REPORT_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "==fuzz driver==",
                  "broken promise")


def compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def run(cmd, **kwargs):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace",
                          timeout=TIMEOUT_S, **kwargs)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found on PATH")
    cxx = compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found (tried $CXX, c++, g++, clang++)")
    probe = tmp_path_factory.mktemp("probe")
    (probe / "probe.cc").write_text("int main() { return 0; }\n")
    linked = run([cxx, "-fsanitize=address,undefined", "probe.cc", "-o", "probe"], cwd=probe)
    if linked.returncode != 0:
        pytest.skip(f"{cxx} cannot link with -fsanitize=address,undefined: {linked.stderr.strip()[-500:]}")

    build = tmp_path_factory.mktemp("native-build")
    configure = ["cmake", "-S", ROOT, "-B", build, "-G", "Ninja", f"-DCMAKE_CXX_COMPILER={cxx}",
                 "-DCMAKE_CXX_FLAGS=-O1 -g", "-DFASTCKPT_NATIVE_TESTS=ON", "-DFASTCKPT_FUZZ=ON",
                 "-DFASTCKPT_ASAN=ON", "-DFASTCKPT_UBSAN=ON", "-DFASTCKPT_WERROR=ON"]
    for cmd in (configure, ["cmake", "--build", build, "--parallel", "2"]):
        done = run(cmd)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    return build


def check(cmd):
    done = run(cmd, env={**os.environ, **SANITIZER_ENV})
    output = done.stdout + done.stderr
    reports = [m for m in REPORT_MARKERS if m in output]
    assert done.returncode == 0 and not reports, (
        f"{' '.join(map(str, cmd))} exited with {done.returncode}"
        f"{' and reported ' + ', '.join(reports) if reports else ''}:\n{output[-8000:]}")


@pytest.mark.parametrize("name", NATIVE_TESTS)
def test_native(build_dir, name):
    check([build_dir / name])


@pytest.mark.parametrize("target", sorted(FUZZ_TARGETS))
def test_fuzz(build_dir, target, tmp_path):
    seeds, dictionary = FUZZ_TARGETS[target]
    check([build_dir / target, f"-runs={FUZZ_RUNS}", "-seed=1", f"-dict={FUZZ / dictionary}",
           f"-artifact_prefix={tmp_path}/", FUZZ / "seeds" / seeds])
