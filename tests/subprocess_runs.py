"""Running a test's subprocess that may die inside TensorFlow: what to show of it, and one rerun after such a crash."""
import subprocess
import warnings
from typing import Optional


def failure_text(stderr: str) -> str:
    """What to show when a subprocess failed: the end of its stderr, or, after a crash, the lines before
    faulthandler's report (where TensorFlow logs a failed check) and the report with the crashing thread's stack,
    which come before the long list of extension modules that ends stderr."""
    crash = stderr.find("Fatal Python error")
    return stderr[max(crash - 1500, 0):crash + 4000] if crash >= 0 else stderr[-3000:]


def crash_outside_our_code(result: subprocess.CompletedProcess) -> Optional[str]:
    """How the process died outside the code under test, or None: killed by a signal, or AddressSanitizer's own
    check failing (heap metadata overwritten by uninstrumented code); never when ASan reported an access of an
    instrumented library (an "ERROR: AddressSanitizer" report), which is ours to fix."""
    output = (result.stdout or "") + (result.stderr or "")
    if "ERROR: AddressSanitizer" in output:
        return None
    if result.returncode < 0:
        return f"killed by signal {-result.returncode}"
    if "AddressSanitizer: CHECK failed" in output:
        return "stopped by AddressSanitizer's own check"
    return None


def run_once_more_after_a_crash(command: list, **kwargs) -> subprocess.CompletedProcess:
    """Runs a subprocess; if it died outside our code (crash_outside_our_code), warns with its crash report and
    runs it once more.

    Why: twice, in fresh clones' first `make test` (2026-12-02), `bench/vs_pytorch.py --quick` died inside
    TensorFlow (a SIGSEGV, then a SIGABRT in the stock `model.fit` warm-up), and passed on every rerun (6 of 6).
    Under AddressSanitizer the same heap corruption shows with all four of our C++ libraries switched off
    (bench/RESULTS.md, twentieth session): it is not in our C++ ops. Such a crash is not what the tests check, but
    it must stay visible: the warning carries the report into the test summary. A second crash, or any ordinary
    failure, fails."""
    result = subprocess.run(command, **kwargs)
    how = crash_outside_our_code(result)
    if how:
        warnings.warn(f"subprocess {how}, rerunning once: {failure_text(result.stderr)}")
        result = subprocess.run(command, **kwargs)
    return result
