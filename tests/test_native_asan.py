"""Our C++ ops' own tests again, with the ops built under AddressSanitizer.

Why: an out-of-bounds or freed-memory write in engine/*.cc does not fail a test by itself; it corrupts the
heap, and the process aborts later somewhere else, at random ("corrupted size vs. prev_size" in a later malloc).
Built with -fsanitize=address (engine/native.py takes the compiler from $CXX, and the flags are part of the
library's name, so these builds sit beside the normal ones), such an access stops the test run at the line that
made it. Only our libraries are instrumented: TensorFlow is not, so this says nothing about its own code.
"""
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from engine import native
from subprocess_runs import crash_outside_our_code, run_once_more_after_a_crash

# Every op of ours, forward and backward, in float32 and bfloat16, on odd shapes and NaN.
KERNEL_TESTS = ["tests/test_bias_kernel.py", "tests/test_layer_norm_kernel.py", "tests/test_attention_kernel.py",
                "tests/test_adamw_kernel.py", "tests/test_token_attention_kernel.py",
                "tests/test_fusion.py::test_the_dropout_kernel_equals_tensorflows_forward_bit_for_bit",
                "tests/test_fusion.py::test_keeps_one_minus_rate_scaled_and_gradient_uses_the_same_mask"]
# Not the files' tests of a whole tiny encoder training with our ops (test_fused_encoder_*): the ops' own tests above
# reach every kernel path, and those three were 43 of the run's 69 s under ASan on the Zen 3 (bench/RESULTS.md,
# 2026-12-07).
NOT_WHOLE_ENCODERS = "not test_fused_encoder_"
SANITIZE = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def _runtime_library(compiler: list, name: str):
    """The compiler's copy of a runtime library, or None (the compiler prints the bare name when it has none)."""
    try:
        path = subprocess.run(compiler + [f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.slow  # five instrumented builds and a pytest run in subprocesses: 2-5 minutes on 2 cores
def test_kernel_tests_pass_with_our_ops_built_under_address_sanitizer(monkeypatch):
    compiler = shlex.split(os.environ.get("CXX", "g++"))
    asan = _runtime_library(compiler, "libasan.so")
    libstdcxx = _runtime_library(compiler, "libstdc++.so.6")
    if asan is None or libstdcxx is None:
        pytest.skip(f"{compiler[0]} has no AddressSanitizer runtime here")
    env = dict(os.environ)
    env.update({
        "CXX": shlex.join(compiler + SANITIZE),
        # Python is not instrumented, so the runtime must be preloaded; libstdc++ with it, or ASan cannot intercept
        # the C++ exceptions TensorFlow throws. Leak reports would be TensorFlow's and Python's own.
        "LD_PRELOAD": f"{asan} {libstdcxx}",
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
    })
    # The instrumented builds first, side by side (engine.native's main), not one by one as the tests load them.
    build = subprocess.run([sys.executable, "-m", "engine.native"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr[-4000:]
    # -s: ASan writes its report to fd 2 and exits at once, which would lose it inside pytest's capture.
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", "-k", NOT_WHOLE_ENCODERS,
               *KERNEL_TESTS]
    result = run_once_more_after_a_crash(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    report = output.find("ERROR: AddressSanitizer")  # its first lines name the access and our function
    assert result.returncode == 0, output[report:report + 4000] if report >= 0 else output[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    # The run used instrumented builds of every library, not the normal ones.
    monkeypatch.setenv("CXX", env["CXX"])
    for library in native.LIBRARIES:
        with open(library.library_path(), "rb") as f:
            assert b"__asan_report" in f.read(), library.name


def test_only_a_crash_outside_instrumented_code_is_rerun():
    def died(returncode, stderr):
        return crash_outside_our_code(subprocess.CompletedProcess([], returncode, "", stderr))

    assert died(-6, "Fatal Python error: Aborted") == "killed by signal 6"
    assert died(1, 'AddressSanitizer: CHECK failed: asan_allocator.cpp:188 "((old)) == ((kAllocBegMagic))"')
    assert died(1, "==1==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6090") is None
    assert died(-6, "==1==ERROR: AddressSanitizer: heap-use-after-free\nFatal Python error: Aborted") is None
    assert died(1, "1 failed") is None
