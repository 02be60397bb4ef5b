"""The two test tiers (tests/conftest.py): ``-m "not slow"`` and ``-m slow`` are both non-empty, share no test,
and together are the whole suite, as pytest itself collects them (in a subprocess, so this session's own -m and
environment play no part)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _start(markexpr: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GRADPARITY_NO_FRAMEWORK_WORKERS"}
    # -n 0: collected in that one process (pyproject's addopts would start pytest-xdist's processes).
    return subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0",
                             "-p", "no:cacheprovider", "-m", markexpr, "tests"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _collected(proc: subprocess.Popen) -> tuple[set[str], int]:
    """The node ids a --collect-only -q run printed, and the size of the whole suite from its last line."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    ids = [line for line in out.splitlines() if "::" in line and not line.startswith(" ")]
    total = re.search(r"(?:\d+/)?(\d+) tests? collected", out)
    assert total, out[-3000:]
    assert len(ids) == len(set(ids)), "a node id printed twice"
    return set(ids), int(total.group(1))


def test_fast_and_slow_tiers_split_the_whole_suite():
    fast_proc, slow_proc = _start("not slow"), _start("slow")  # side by side: each collects the whole suite
    (fast, total), (slow, total_too) = _collected(fast_proc), _collected(slow_proc)
    assert total == total_too
    assert fast and slow, (len(fast), len(slow))
    assert not fast & slow, sorted(fast & slow)[:10]
    assert len(fast) + len(slow) == total, (len(fast), len(slow), total)
    # Spot checks of the classification: a framework test is slow, a numpy-only one fast.
    assert "tests/test_tiers.py::test_fast_and_slow_tiers_split_the_whole_suite" in fast
    assert any(i.startswith("tests/test_parity.py::test_backend_matches_numpy_reference[") for i in slow)
    assert not any(i.startswith("tests/test_parity.py::") for i in fast)
