"""`rigtrain` commands for the tests, each forked from a process that has already imported
what every command imports (torch, DeepSpeed, TensorBoard, torch._dynamo that torch's
optimizers pull in), instead of a fresh interpreter importing them again.

Why: the suite runs about a hundred commands, and a fresh `python -m rigtrain train` spends
about 3 of its first 4.5 seconds importing (torch 0.9 s; torch._dynamo and torch._inductor
1.6 s, through torch.optim and DeepSpeed's Muon module, which train/engine.py now keeps out;
DeepSpeed 0.2 s; on this 2-core machine). A forked child starts with all of that loaded and runs the command as a fresh
process would: its own arguments, environment, working directory, stdin from /dev/null,
stdout and stderr into files, exit code back. Nothing has run a parallel op or started a
thread in the preloaded process, so the child's CPU threads come from its own environment
(OMP_NUM_THREADS), as in a fresh process.

What it does not prove, so the tests that need a fresh process start one themselves
(test_faults.py's signals, the launcher's own children, `subprocess` with a shim on
PYTHONPATH): import order and start-up cost. Every worker rank a launcher starts is a fresh
process either way (sys.executable -m rigtrain.train.worker).

    python tests/preloaded_cli.py      # the server: one JSON request per line on stdin
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

INHERITED = ("SIGINT", "SIGTERM", "SIGHUP")  # the stop signals: ignored ones stay ignored across exec


class PreloadedCli:
    """A server process per test process (per pytest-xdist worker), started at first use."""

    def __init__(self):
        self._server: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen(
                [sys.executable, __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                # Unbuffered bytes: a buffered reader could take the {"code"} line into its
                # buffer with the {"pid"} line when a command ends at once, and select() on the
                # pipe would then wait the whole timeout for a line already read (a `train
                # --config missing.toml` "hung" 120 s, once in several suite runs).
                bufsize=0,
                env=os.environ.copy(),
            )
            ready = self._server.stdout.readline()
            if ready.strip() != b"ready":
                raise RuntimeError(f"tests/preloaded_cli.py did not start: {ready!r}")
        return self._server

    def run(
        self, args: list[str], *, env: dict, cwd: Path | None, timeout: float, script: Path | None = None
    ) -> subprocess.CompletedProcess:
        """`rigtrain ARGS`, or with script= `python SCRIPT ARGS`, in a forked child."""
        with self._lock, tempfile.TemporaryDirectory(prefix="rigtrain-cli-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            server = self._start()
            request = {"args": args, "env": env, "cwd": str(cwd or os.getcwd()), "out": str(out), "err": str(err)}
            # A new interpreter started from here would inherit these ignored (a suite run as
            # `bash setup/test.sh &` ignores SIGINT, under nohup SIGHUP), so the child does too.
            request["ignored"] = [
                name for name in INHERITED if signal.getsignal(getattr(signal, name)) == signal.SIG_IGN
            ]
            if script is not None:
                request["script"] = str(script)
            self._send(server, request)
            pid = json.loads(server.stdout.readline())["pid"]
            deadline = time.monotonic() + timeout
            if not select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                try:
                    os.kill(pid, 9)  # the timeout: as subprocess.run kills its child
                except ProcessLookupError:
                    pass  # it ended as the time ran out: its answer is on the way
                else:
                    server.stdout.readline()
                    raise subprocess.TimeoutExpired(["rigtrain", *args], timeout, out.read_text(), err.read_text())
            code = json.loads(server.stdout.readline())["code"]
            return subprocess.CompletedProcess(["rigtrain", *args], code, out.read_text(), err.read_text())

    @staticmethod
    def _send(server: subprocess.Popen, request: dict) -> None:
        line = (json.dumps(request) + "\n").encode()
        while line:  # a raw write may take part of a request larger than the pipe's buffer
            line = line[server.stdin.write(line) :]

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.stdin.close()
            self._server.wait(timeout=30)


def _preload() -> None:
    from rigtrain.train.engine import without_deepspeed_muon

    without_deepspeed_muon()  # as every process that trains: DeepSpeed's Muon modules and torch._inductor stay out
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch.optim imports it at an optimizer's first step)
    import torch.utils.tensorboard  # noqa: F401

    import rigtrain.cli  # noqa: F401
    import rigtrain.data.prepare  # noqa: F401
    import rigtrain.train.launch  # noqa: F401
    import rigtrain.train.planning  # noqa: F401
    import rigtrain.train.trainer  # noqa: F401

    _preload_pyplot()
    # nothing here runs an op: torch's thread pool starts in each child, sized by its environment


def _preload_pyplot() -> None:
    """The evaluation's pictures (at the end of most runs a test starts) and the profile's
    and sweep's charts: pyplot is 0.5 s of CPU a command, the most of what a forked command
    still imported (measured with -X importtime after the rest of the preload: 0.8 s in all)."""
    import matplotlib

    matplotlib.use("Agg")  # as rigtrain's pictures choose it
    import matplotlib.pyplot  # noqa: F401


def _child(request: dict) -> None:
    """In the forked child: become the command."""
    import atexit
    import runpy
    import signal
    import traceback

    code = 1
    try:
        for name in INHERITED:  # what exec leaves: an ignored signal ignored, the rest their default
            default = signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL
            signal.signal(getattr(signal, name), signal.SIG_IGN if name in request["ignored"] else default)
        # Python ignores SIGPIPE from its start, so a write to a closed pipe is an exception
        # a command can handle (terminal.OutlivesItsReader, a pool's broken-worker path); with
        # the kernel's default here instead, a `data prepare` in the suite died of SIGPIPE
        # (exit -13, once in a few hundred runs under load), where a user's would not have.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request.get("script")
        sys.argv = [script or "rigtrain", *request["args"]]
        from rigtrain.cli import run  # the entry point's own: its streams, then main

        try:
            if script:  # a test's own script, as `python SCRIPT ARGS` runs it
                runpy.run_path(script, run_name="__main__")
                code = 0
            else:
                code = run()  # sys.argv is the command's
        except SystemExit as stop:  # argparse's errors and --help, as `python -m rigtrain` exits
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code if isinstance(code, int) else 1)


def _serve() -> None:
    # The answers go out on a copy of stdout; stdout itself goes to stderr, where what the
    # libraries print while loading (DeepSpeed's accelerator line) does not garble them.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answers.close()
            _child(request)
        print(json.dumps({"pid": pid}), file=answers, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)


if __name__ == "__main__":
    _serve()
