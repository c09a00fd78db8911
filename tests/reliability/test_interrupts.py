"""Interrupted conversions (SIGINT / SIGTERM mid-export) leave no partial output."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_convert_leaves_nothing(tmp_path, sig, command):
    """Also export, whose staging directory a SIGTERM left behind (it unwound on SIGINT only)."""
    import signal

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    out, staging = ((tmp_path / "out", ".out.partial-") if command == "convert" else
                    (tmp_path / "m.onnx", ".toolkit-export-"))
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", command, "llama", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # wait until the staging directory exists (the conversion is under way), then interrupt
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(staging) for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "convert never started"
        time.sleep(0.05)
    time.sleep(4)  # into torch import / export: the slow part a user would interrupt
    assert proc.poll() is None, "convert finished before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    # 128 + signum, the shell's convention. After SIGINT, also death by SIGINT itself,
    # which the shell reports as the same 130: seen once in ~15 runs, after main had
    # printed "interrupted" (Python re-raises SIGINT at exit when a KeyboardInterrupt
    # went unhandled somewhere; where, in torch's import, is not known)
    allowed = {128 + getattr(signal, sig)} | ({-signal.SIGINT} if sig == "SIGINT" else set())
    assert proc.returncode in allowed and "interrupted" in err, (proc.returncode, err)
    assert list(tmp_path.iterdir()) == [], "an interrupted convert must leave no output or staging directory"
    assert "Traceback" not in err
