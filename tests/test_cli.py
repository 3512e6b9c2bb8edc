"""Bad command-line values stop with one readable line, not a traceback."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (("cloud", "--bundle", "/nonexistent", "--listen", "127.0.0.1:0"), "is not a tier bundle"),
    (("edge", "--bundle", "/nonexistent", "--listen", "nonsense"), "expected HOST:PORT"),
    (("device", "--bundle", "/x", "--max-batch", "-3"), "positive integer"),
    (("training.train", "--out", "/tmp/never", "--epochs", "many"), "epochs"),
    (("training.train", "--out", "/tmp/never", "--mode", "sideways"), "mode"),
    (("training.export", "--checkpoint", "/nonexistent.safetensors", "--out", "/tmp/never"), "does not exist"),
    (("scripts.launch_local", "--bundle", "/nonexistent"), "holds no exported bundle"),
    (("device.client", "--target", "127.0.0.1:1", "--data", "svhn"), "unknown data kind"),
    (("training.train", "--out", "/tmp/never", "--architecture", "resnet1000"), "unknown backbone"),
    (("cloud", "--bundle", "/x", "--plugin", "no_such_module_here"), "cannot import plugin module"),
    (("edge", "--bundle", "/x", "--link", "10mb,20ms"), "bad link rate '10mb'"),
    (("edge", "--bundle", "/x", "--compress", "lz4"), "unknown compression"),
    (("edge", "--bundle", "/x", "--compute-scale", "0"), "--compute-scale: expected a positive number, got '0'"),
    (("scripts.launch_local", "--bundle", "/x", "--link", "10mbit"), "expected RATE,RTT"),
])
def test_one_line_errors(args, words):
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert words in result.stderr.strip().splitlines()[-1]  # the one line that says what was wrong


def test_tier_refuses_a_bundle_of_another_tier(tiny_bundle):
    result = run("edge", "--bundle", str(tiny_bundle / "cloud"), "--listen", "127.0.0.1:0")
    assert result.returncode == 2 and "is the cloud bundle, not the edge bundle" in result.stderr


def test_tier_needs_next_unless_last(tiny_bundle):
    result = run("edge", "--bundle", str(tiny_bundle), "--listen", "127.0.0.1:0")
    assert result.returncode == 2 and "needs --next" in result.stderr
    result = run("cloud", "--bundle", str(tiny_bundle), "--listen", "127.0.0.1:0", "--next", "127.0.0.1:9")
    assert result.returncode == 2 and "takes no --next" in result.stderr


def test_busy_port_is_one_line(tiny_bundle):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run("cloud", "--bundle", str(tiny_bundle), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not listen" in result.stderr.strip().splitlines()[-1]


def test_unreachable_device_is_one_line():
    result = run("device.client", "--target", "127.0.0.1:1", "--limit", "4", "--timeout", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "did not answer Describe" in result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="the allocator tuning is for glibc")
def test_tiers_keep_freed_memory_for_reuse():
    """The tier start-up tuning takes on glibc (in a child process: it changes the allocator for good)."""
    code = "from common.serving.host import keep_freed_memory; import sys; sys.exit(0 if keep_freed_memory() else 1)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_tier_entry_points_set_environment_defaults_before_torch_and_explicit_settings_win():
    """The ``python -m TIER`` entry point sets the defaults before torch loads (read after ``--help``, which parses
    the flags once everything is imported)."""
    code = ("import atexit, os; "
            "atexit.register(lambda: print(os.environ['OMP_WAIT_POLICY'], os.environ['THP_MEM_ALLOC_ENABLE'])); "
            "from device.__main__ import main; main(['--help'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=60, capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["PASSIVE", "1"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                         timeout=60, capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["PASSIVE", "0"]


def test_importing_the_tier_module_changes_no_environment():
    code = ("import os; import common.serving.tier; "
            "print('OMP_WAIT_POLICY' in os.environ, 'THP_MEM_ALLOC_ENABLE' in os.environ)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=60, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
