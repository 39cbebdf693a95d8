"""The tests' launcher (tests/launcher.py) runs a script as `python script.py` does."""

import signal
import subprocess
import sys

import pytest

import launcher

SCRIPT = """
import atexit, os, sys, threading, time

from huggingface_hub import constants

atexit.register(print, "atexit ran")
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()
print(sys.argv[1:], os.getcwd(), os.environ.get("PICO_TEST"), constants.ENDPOINT,
      sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print("to stderr", file=sys.stderr)
if sys.argv[1] == "exit":
    sys.exit(3)
if sys.argv[1] == "message":
    sys.exit("a message")
if sys.argv[1] == "raise":
    raise ValueError("boom")
if sys.argv[1] == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("how", ["return", "exit", "message", "raise"])
def test_a_run_ends_as_python_ends_it(tmp_path, how):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {"PICO_TEST": "set", "HF_ENDPOINT": "http://127.0.0.1:9"}  # read at huggingface_hub's import
    args = dict(capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    expected = subprocess.run([sys.executable, "script.py", how], **args)
    result = launcher.run([sys.executable, "script.py", how], **args)
    assert result.returncode == expected.returncode
    assert result.stdout == expected.stdout and "http://127.0.0.1:9" in result.stdout
    # A traceback names the launcher's frames too: its last line is the same.
    assert result.stderr.splitlines()[-1] == expected.stderr.splitlines()[-1]


def test_a_run_killed_by_a_signal_has_minus_the_signal_as_returncode(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    proc = launcher.Popen([sys.executable, "-u", str(tmp_path / "script.py"), "sleep"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "sleeping\n" in proc.stdout  # reads up to that line, as the run prints it
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.1)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.communicate(timeout=0.1)
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL
