"""Runs the repository's scripts as `python script.py args` does, but about 3 s sooner
(on the README's 2-core AMD EPYC).

Most of an end-to-end test's time on 2 CPU cores went to importing torch, numpy and pyarrow again
in every `python train.py` it started. Here a server process imports them once, and each run is a
fork of it that then runs the script as `__main__`, with its own arguments, working directory,
environment and standard streams, and exits the way Python does (threads joined, atexit run,
status as `python` gives it, -N when killed by signal N), less the teardown of its modules (see
`become`). The server imports none of pico's
modules, nor huggingface_hub, which reads its settings from the environment at import: each run
imports those itself, after its environment is set, as a fresh process would.

    result = launcher.run([sys.executable, "train.py", config], capture_output=True, text=True)
    proc = launcher.Popen([sys.executable, "-u", "train.py", config], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)

take the arguments of subprocess.run and subprocess.Popen that the tests use. A run that needs
more (a preexec_fn, `python -m`) uses subprocess itself, as every run does off Linux.
"""

import atexit
import importlib
import importlib.util
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# What `import train` spends its time on, none of it configured by the environment the tests vary.
# (torch._dynamo: torch.nn.init imports it on first use.)
PRELOADED = ["torch", "torch._dynamo", "torch.distributed.checkpoint.state_dict",
             "torch.distributed.elastic.multiprocessing.errors", "torch.nn.parallel",
             "torch.utils.checkpoint", "numpy", "pyarrow.parquet", "pyarrow.compute", "safetensors.torch",
             "yaml"]
OPTIONAL = ["pandas"]  # where installed (datasets needs it), pyarrow's to_numpy imports it


# ---------------------------------------------------------------------------------------------
# The server: `python tests/launcher.py FD`, FD one end of a SOCK_SEQPACKET socket pair
# ---------------------------------------------------------------------------------------------

def serve(channel: socket.socket) -> dict | None:
    """Forks a run for each request on `channel` and reports each run's exit there. Returns, in a
    forked run only, its request; in the server, None once the tests close the channel."""
    for module in PRELOADED + [m for m in OPTIONAL if importlib.util.find_spec(m)]:
        importlib.import_module(module)
    while True:
        readable, _, _ = select.select([channel], [], [], 0.05)
        if readable:
            message, fds, _, _ = socket.recv_fds(channel, 1 << 20, 3)
            if not message:
                return None
            pid = os.fork()
            if pid == 0:
                channel.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                return json.loads(message)
            for fd in fds:
                os.close(fd)
            channel.send(json.dumps({"started": pid}).encode())
        while True:  # report the runs that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no runs
                break
            if pid == 0:
                break
            channel.send(json.dumps({"ended": pid, "returncode": os.waitstatus_to_exitcode(status)}).encode())


def become(request: dict):
    """This forked process, made what `python [-u] SCRIPT ARGS` in request["cwd"] would start, and
    ended as Python ends one: non-daemon threads joined, atexit's functions run, the streams
    flushed, the status Python would give. Then os._exit: Python's own teardown of every module
    would follow, which in a fork of the server copies most of its memory page by page (0.8 s a
    run on the 2-core AMD EPYC); what it could change, a daemon thread dying during it, tests/test_stop.py also runs in
    plain processes."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script, *_ = request["argv"]
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    if request["unbuffered"]:
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
    interrupted = False
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:  # as the interpreter reports an uncaught exception
        sys.excepthook(type(e), e, e.__traceback__)
        status, interrupted = 1, isinstance(e, KeyboardInterrupt)
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, as Python ignores it at exit
            pass
    if interrupted:  # Python ends an uncaught Ctrl-C by SIGINT itself: status -2
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)


# ---------------------------------------------------------------------------------------------
# The tests' side
# ---------------------------------------------------------------------------------------------

class Server:
    """The tests' end of the channel: asks for runs, and keeps the exits the server reports."""

    def __init__(self):
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL)
        theirs.close()
        self.lock = threading.Lock()
        self.returncodes: dict[int, int] = {}  # pid -> returncode, of the runs that ended
        self.started: list[int] = []

    def start(self, request: dict, fds: list[int]) -> int:
        with self.lock:
            socket.send_fds(self.channel, [json.dumps(request).encode()], fds)
            while not self.started:
                self.receive(timeout=None)
            return self.started.pop()

    def returncode(self, pid: int, timeout: float | None) -> int | None:
        """The run's returncode, waiting at most `timeout` seconds (None: until it ends)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while pid not in self.returncodes:
                left = None if deadline is None else max(deadline - time.monotonic(), 0)
                if not self.receive(left) and left == 0:
                    return None
            return self.returncodes[pid]

    def receive(self, timeout: float | None) -> bool:
        """Takes one message from the server, if one comes within `timeout` seconds."""
        self.channel.settimeout(timeout)
        try:
            message = self.channel.recv(1 << 16)
        except (TimeoutError, BlockingIOError):
            return False
        if not message:
            raise RuntimeError(f"the launcher's server exited with {self.process.wait()}")
        message = json.loads(message)
        if "started" in message:
            self.started.append(message["started"])
        else:
            self.returncodes[message["ended"]] = message["returncode"]
        return True

    def close(self):
        self.channel.close()
        self.process.wait(timeout=10)


_server: Server | None = None


def server() -> Server:
    global _server
    if _server is None:
        _server = Server()
        atexit.register(_server.close)
    return _server


class Popen:
    """A run started by the server, with the parts of subprocess.Popen the tests use: stdout and
    stderr are PIPE, DEVNULL, a file, None (the tests' own) or, for stderr, STDOUT."""

    def __init__(self, argv, stdout=None, stderr=None, text=False, cwd=None, env=None):
        self.args, self.text, self.returncode = [str(arg) for arg in argv], text, None
        python, *argv = self.args
        unbuffered = argv[:1] == ["-u"]
        argv = argv[1:] if unbuffered else argv  # SCRIPT ARGS...
        if python != sys.executable or not argv or argv[0].startswith("-"):
            raise ValueError(f"launcher runs `{sys.executable} [-u] SCRIPT ...`, not {self.args}")
        stdin = os.open(os.devnull, os.O_RDONLY)
        self.stdout, out = self._stream(stdout, inherited=1)
        if stderr == subprocess.STDOUT:
            self.stderr, err = None, os.dup(out)
        else:
            self.stderr, err = self._stream(stderr, inherited=2)
        request = {"argv": argv, "cwd": str(cwd or os.getcwd()), "env": dict(env or os.environ),
                   "unbuffered": unbuffered}
        try:
            self.pid = server().start(request, [stdin, out, err])
        finally:
            for fd in (stdin, out, err):
                os.close(fd)

    def _stream(self, how, inherited: int):
        """(what the test reads, the run's end of it: a descriptor to close here)"""
        if how == subprocess.PIPE:
            read, write = os.pipe()
            return os.fdopen(read, "r" if self.text else "rb"), write
        if how == subprocess.DEVNULL:
            return None, os.open(os.devnull, os.O_WRONLY)
        return None, os.dup(inherited if how is None else how.fileno())  # None, or a file

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = server().returncode(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = server().returncode(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None):
        """(stdout, stderr) as subprocess.Popen.communicate gives them: the pipes read to their end
        and the run ended within `timeout` seconds, or TimeoutExpired."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pipes = [stream for stream in (self.stdout, self.stderr) if stream is not None]
        output = {}
        readers = [threading.Thread(target=lambda p=pipe: output.update({p: p.read()}), daemon=True)
                   for pipe in pipes]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        if any(reader.is_alive() for reader in readers):
            raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        return output.get(self.stdout), output.get(self.stderr)


def run(argv, capture_output=False, text=False, cwd=None, env=None, timeout=None, check=False):
    """subprocess.run, through the server. Captured output goes to temporary files, read once the
    run has ended, so a run never waits on a full pipe."""
    files = [tempfile.TemporaryFile() for _ in range(2)] if capture_output else [None, None]
    proc = Popen(argv, stdout=files[0], stderr=files[1], text=text, cwd=cwd, env=env)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    output = [read(file, text) if file else None for file in files]
    result = subprocess.CompletedProcess(argv, proc.returncode, *output)
    if check:
        result.check_returncode()
    return result


def read(file, text: bool):
    with file:
        file.seek(0)
        content = file.read()
    return content.decode() if text else content


if sys.platform != "linux":  # forking after torch's import, and SOCK_SEQPACKET, are Linux's
    Popen, run = subprocess.Popen, subprocess.run

if __name__ == "__main__":
    # A run leaves serve() in the forked process and goes on here, as `python SCRIPT` would go on
    # into SCRIPT: an exception or exit in it ends this process the way it would end that one.
    request = serve(socket.socket(fileno=int(sys.argv[1])))
    if request is not None:
        become(request)
