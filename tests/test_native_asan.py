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
import warnings

import pytest

from engine import native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every op of ours, forward and backward, in float32 and bfloat16, on odd shapes and NaN.
KERNEL_TESTS = ["tests/test_bias_kernel.py", "tests/test_layer_norm_kernel.py", "tests/test_attention_kernel.py",
                "tests/test_adamw_kernel.py",
                "tests/test_fusion.py::test_the_dropout_kernel_equals_tensorflows_forward_bit_for_bit",
                "tests/test_fusion.py::test_keeps_one_minus_rate_scaled_and_gradient_uses_the_same_mask"]
SANITIZE = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def _runtime_library(compiler: list, name: str):
    """The compiler's copy of a runtime library, or None (the compiler prints the bare name when it has none)."""
    try:
        path = subprocess.run(compiler + [f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


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
    # -s: ASan writes its report to fd 2 and exits at once, which would lose it inside pytest's capture.
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    died_elsewhere = result.returncode < 0 or "AddressSanitizer: CHECK failed" in output
    if died_elsewhere and "ERROR: AddressSanitizer" not in output:
        # Not an access of ours (those are ERROR reports): heap metadata overwritten by uninstrumented code, which
        # TensorFlow's own runs show now and then with our libraries off (bench/RESULTS.md, twentieth session).
        warnings.warn(f"the sanitized run died outside our code, rerunning once: {output[-2000:]}")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
    report = output.find("ERROR: AddressSanitizer")  # its first lines name the access and our function
    assert result.returncode == 0, output[report:report + 4000] if report >= 0 else output[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    # The run used instrumented builds of every library, not the normal ones.
    monkeypatch.setenv("CXX", env["CXX"])
    for library in native.LIBRARIES:
        with open(library.library_path(), "rb") as f:
            assert b"__asan_report" in f.read(), library.name
