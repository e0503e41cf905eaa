"""Bad input is exit code 2 with one line that names the file or field; no traceback."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PRELOADED, run_cli, run_script
from preloaded_cli import PreloadedCli


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_is_instant_and_imports_no_heavy_library():
    code = (
        "import sys; from rigtrain.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'deepspeed', 'cv2', 'av', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "data" in result.stdout


def test_version_names_what_a_bug_report_needs_without_importing_it():
    import importlib.metadata
    import platform

    code = (
        "import sys; from rigtrain.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as stop:\n    assert stop.code in (0, None)\n"
        "print(sorted(m for m in ('torch', 'deepspeed', 'pynvml') if m in sys.modules))"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    torch_version = importlib.metadata.version("torch")
    assert lines[0].startswith(f"rigtrain {importlib.metadata.version('rigtrain')} (torch {torch_version}, deepspeed ")
    assert lines[0].endswith(f"; Python {platform.python_version()})") and lines[1] == "[]"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--data", "/nonexistent/shards"], ["/nonexistent/shards", "no such folder"]),
        (["train", "--preset", "huge"], ["--preset huge", "demo"]),
        (["train", "--set", "train.stepz=3"], ["train.stepz"]),
        (["train", "--set", "train.steps=many"], ["train.steps", "integer"]),
        (["train", "--set", "nonsense"], ["KEY=VALUE"]),
        (["train", "--resume"], ["--resume", "--out"]),
        (["train", "--config", "/nonexistent.toml"], ["/nonexistent.toml"]),
        (["train", "--bogus-flag"], ["--bogus-flag"]),
        (["data", "prepare", "/nonexistent/videos", "/tmp/x"], ["/nonexistent/videos"]),
        (["data", "prepare", "/tmp", "/tmp/x", "--set", "train.steps=3"], ["data.*"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragments):
    assert_user_error(run_cli(*args, timeout=120), *fragments)


def test_train_on_a_folder_of_raw_videos_decodes_on_the_fly_and_says_to_prepare(tmp_path, shared_data):
    """A user's own videos, never prepared: decoded on the fly, and evaluated without
    embedding any training clip (they only serve kNN and the probe, which need labels a
    user's videos do not have; decoding them on demand would double the evaluation)."""
    import json
    import shutil

    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(shared_data / "videos" / "bikes.mp4", videos)
    shutil.copy(shared_data / "videos" / "carphone_pristine.mp4", videos)
    (videos / "cut.mp4").write_bytes((videos / "bikes.mp4").read_bytes()[:100_000])  # a download cut short
    result = run_cli(
        "train",
        "--data",
        str(videos),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--set",
        "train.micro_batch_size=4",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "decoded on the fly" in result.stdout and "rigtrain data prepare" in result.stdout
    assert "14 clips from" in result.stdout  # 10 s of bikes.mp4 and 4 of carphone at 1-second clips
    assert result.stdout.count("[rigtrain] cut.mp4 left out: cannot be opened as a video") == 1  # said once
    # and kept in the run's log, though said before the folder was the run's
    log = (tmp_path / "run" / "train.log").read_text()
    assert "cut.mp4 left out" in log.split("\n", 2)[2] and "holds videos, not shards" in log.splitlines()[1], log
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert record["clips"]["bank"] == 0 and record["clips"]["heldout"] in (4, 10), record["clips"]
    assert any("no labels" in note for note in record["notes"])
    again = run_cli("eval", str(tmp_path / "run"), "--json", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["clips"] == record["clips"]  # --json: nothing else on stdout
    assert "rigtrain: cut.mp4 left out: cannot be opened as a video" in again.stderr
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("train", "--data", str(tmp_path / "empty")), "neither prepared shards")


def test_a_folder_of_only_corrupt_videos(tmp_path, shared_data):
    """A truncated real H.264 file: one line from rigtrain, nothing from FFmpeg."""
    src = tmp_path / "src"
    src.mkdir()
    data = (shared_data / "videos" / "bikes.mp4").read_bytes()
    (src / "broken.mp4").write_bytes(data[: len(data) // 2])
    assert_user_error(
        run_cli("data", "prepare", str(src), str(tmp_path / "out"), "--workers", "1"), "broken.mp4", "cannot be opened"
    )


def test_resume_of_a_missing_run(tmp_path):
    assert_user_error(run_cli("train", "--out", str(tmp_path / "nope"), "--resume", timeout=120), "config.json")


def test_resume_keeps_the_runs_own_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"config": {}}')
    assert_user_error(run_cli("train", "--out", str(run), "--resume", "--preset", "small"), "--preset")
    assert_user_error(run_cli("train", "--out", str(run)), "--resume")  # never overwrites a run


def test_data_synth_and_prepare_commands(tmp_path):
    result = run_cli("data", "synth", str(tmp_path / "world"), "--videos", "2", "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "world" / "shapes_0001.mp4").is_file()
    assert "\r" not in result.stdout and "wrote 2/2 videos\n" in result.stdout  # a log gets whole lines
    assert_user_error(run_cli("data", "synth", str(tmp_path / "world")), "not an empty folder")
    result = run_cli("data", "prepare", str(tmp_path / "world"), str(tmp_path / "prep"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "prepared 12 clips from 2 video(s)" in result.stdout
    shard_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "prep").rglob("*.npy")}
    again = run_cli("data", "prepare", str(tmp_path / "world"), str(tmp_path / "prep"))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    assert shard_files == {p: p.stat().st_mtime_ns for p in (tmp_path / "prep").rglob("*.npy")}  # untouched
    # the same folder with another clip shape is refused, naming the key
    assert_user_error(
        run_cli("data", "prepare", str(tmp_path / "world"), str(tmp_path / "prep"), "--set", "data.fps=4"),
        "fps=8.0",
        "new folder",
    )
    # and training reads the user's prepared shards
    result = run_cli(
        "train",
        "--data",
        str(tmp_path / "prep"),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--set",
        "train.micro_batch_size=4",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step00000002" / "complete.json").is_file()
    # shards cut for another clip shape are refused, naming the key
    assert_user_error(run_cli("train", "--data", str(tmp_path / "prep"), "--set", "data.fps=4"), "data.fps")


def test_help_config_lists_documented_keys():
    result = run_cli("train", "--help-config")
    assert result.returncode == 0
    for key in ("train.nproc", "train.ckpt_every", "train.keep_ckpts", "train.log_every", "data.workers", "rig.gpus"):
        assert key in result.stdout


def test_counter_rewrites_in_place_on_a_terminal_and_prints_tenths_into_a_log():
    import io

    from rigtrain.terminal import counter

    logged = io.StringIO()
    show = counter(lambda done, total: f"{done}/{total}", logged)
    for done in range(1, 1001):
        show(done, 1000)
    lines = logged.getvalue().splitlines()
    assert lines == ["1/1000"] + [f"{k * 100}/1000" for k in range(1, 11)]  # the start, each tenth

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    show = counter(lambda done, total: f"{done}/{total}", screen)
    for done in range(1, 4):
        show(done, 3)
    assert screen.getvalue() == "\r1/3\r2/3\r3/3\n"


def test_output_outlives_a_reader_that_is_gone():
    """`rigtrain train | head`, or a terminal that hung up: the first failing write sends the
    stream to the null device and the program goes on, where the print's BrokenPipeError
    (or EIO) would have ended it."""
    import io

    from rigtrain.terminal import OutlivesItsReader

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has exited
    stream = OutlivesItsReader(io.TextIOWrapper(io.FileIO(write_end, "w"), write_through=True))
    print("a line no one reads", file=stream, flush=True)
    print("and another", file=stream, flush=True)
    assert os.path.samefile(f"/proc/self/fd/{write_end}", os.devnull)  # for child processes too
    stream.close()


def test_output_is_copied_to_a_file_as_the_terminal_shows_it(tmp_path, monkeypatch):
    """RUN_DIR/train.log's copy: whole lines from stdout and stderr, a counter's carriage
    returns resolved to what a terminal shows last, a copy to the same file entered again
    adding nothing, and a file that cannot be written (a full disk: /dev/full) costing the
    copy, never the program."""
    import io

    from rigtrain.terminal import OutlivesItsReader, copy_output_to

    screen, errors = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", OutlivesItsReader(screen))
    monkeypatch.setattr(sys, "stderr", OutlivesItsReader(errors))
    log = tmp_path / "train.log"
    with copy_output_to(log, "=== header") as copy:
        assert copy is not None
        print("one")
        print("two", file=sys.stderr)
        sys.stdout.write("a line in ")
        sys.stdout.write("pieces\n\rcounting 1/2\rcounting 2/2\n")
        with copy_output_to(tmp_path / "." / "train.log") as again:  # a rank in the launcher's process
            assert again is None
            print("once")
        for done in range(100_000):  # a counter of hours on a terminal: held as it shows, not whole
            sys.stdout.write(f"\rcounting {done}")
        assert len(sys.stdout._pending) < 100
        sys.stdout.write("\n" + "x" * 70_000)  # a line that never ends is kept in pieces
        sys.stdout.write("unended")
    print("after")
    assert log.read_text() == (
        "=== header\none\ntwo\na line in pieces\ncounting 2/2\nonce\ncounting 99999\n" + "x" * 70_000 + "\nunended\n"
    )
    assert screen.getvalue().startswith("one\na line in pieces\n\rcounting 1/2\rcounting 2/2\nonce\n\rcounting 0")
    assert screen.getvalue().endswith("x" * 70_000 + "unendedafter\n")
    with copy_output_to(Path("/dev/full")) as full:
        print("the disk is full")
        print("and the program goes on")
    assert full is not None and full.fd is None  # the copy ended at its first failed write
    assert screen.getvalue().endswith("the disk is full\nand the program goes on\n")


def test_children_s_output_is_passed_on_in_whole_lines_and_copied(tmp_path, monkeypatch):
    """OutputRelay (a launcher's ranks): what two children write, in Python or straight to
    their descriptors, reaches this process's streams and their copy in whole lines, never
    cut into by the other child; a last line without its end and bytes that are not UTF-8
    are passed on too, and a stream of this process that fails costs the lines, not the
    children. What they write to their third pipe (a rank's faulthandler dump) goes into
    the copy only, each dump whole under a line with the child's name, though the two
    children write theirs in pieces at the same time."""
    import io

    from rigtrain.output_relay import OUTPUT_RELAYED, STACKS_FD, OutputRelay
    from rigtrain.terminal import OutlivesItsReader, copy_output_to

    screen, errors = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", OutlivesItsReader(screen))
    monkeypatch.setattr(sys, "stderr", OutlivesItsReader(errors))
    halves = """
import os, sys, time
assert os.environ["{relayed}"] == "1" and os.environ["PYTHONUNBUFFERED"] == "1"
os.write(1, b"first half of {name}'s line, ")
time.sleep(0.3)
os.write(1, b"second half\\n")
print("{name} in Python")
os.write(2, b"{name} on stderr, not UTF-8: \\xff\\n{name}'s last words, unended")
for piece in range(3):  # a dump, in pieces: the other child's come in between
    os.write(int(os.environ["{stacks}"]), b"{name}'s stack, piece %d\\n" % piece)
    time.sleep(0.03)
"""
    relay = OutputRelay()
    with copy_output_to(tmp_path / "train.log") as copy:
        assert copy is not None
        children = []
        for name in ("a", "b"):
            code = halves.format(name=name, relayed=OUTPUT_RELAYED, stacks=STACKS_FD)
            children.append(relay.start([sys.executable, "-c", code], dict(os.environ), f"child {name}"))
        assert [c.wait(timeout=60) for c in children] == [0, 0]
        relay.drain()
        print("the parent's line after them")
    out, err = screen.getvalue().splitlines(), errors.getvalue().splitlines()
    for name in ("a", "b"):
        assert f"first half of {name}'s line, second half" in out and f"{name} in Python" in out
        assert f"{name} on stderr, not UTF-8: \ufffd" in err and f"{name}'s last words, unended" in err
    assert out[-1] == "the parent's line after them"
    copied = (tmp_path / "train.log").read_text()
    for name in ("a", "b"):
        stack = "".join(f"{name}'s stack, piece {piece}\n" for piece in range(3))
        assert f"[rigtrain] child {name}'s Python stacks (faulthandler):\n{stack}" in copied, copied
        copied = copied.replace(f"[rigtrain] child {name}'s Python stacks (faulthandler):\n{stack}", "")
    assert sorted(copied.splitlines()) == sorted(out + err)  # the stacks in the copy only
    # a counter rewritten in place (tqdm, a compiler's progress) shows as it changes, not at its line's end
    go_on = tmp_path / "go-on"
    counting = (
        f"import os, time\nos.write(1, b'counting 1/2\\r')\n"
        f"while not os.path.exists({str(go_on)!r}): time.sleep(0.05)\nos.write(1, b'counting 2/2\\n')"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", counting], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    relay.watch(child)
    try:
        deadline = time.monotonic() + 30
        while not screen.getvalue().endswith("counting 1/2\r") and time.monotonic() < deadline:
            time.sleep(0.05)
        shown_before_its_end = screen.getvalue().endswith("counting 1/2\r")
    finally:
        go_on.touch()  # the child ends, whatever was seen
    assert shown_before_its_end
    assert child.wait(timeout=60) == 0
    relay.drain()
    assert screen.getvalue().endswith("counting 1/2\rcounting 2/2\n")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    sys.stdout.close()  # a stream that fails (ValueError on a closed file)
    child = subprocess.Popen(
        [sys.executable, "-c", "print('x')"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    relay.watch(child)
    assert child.wait(timeout=60) == 0
    relay.drain()


def test_threads_printing_while_the_copy_begins_and_ends_never_fail(tmp_path, monkeypatch):
    """A thread's warning (telemetry, TensorBoard's writer) printed just as a run's copy ends
    must not raise in that thread: the copy it started with is ended, not gone."""
    import io
    import threading

    from rigtrain.terminal import OutlivesItsReader, copy_output_to

    monkeypatch.setattr(sys, "stdout", OutlivesItsReader(io.StringIO()))
    failures, done = [], threading.Event()

    def chatter():
        try:
            while not done.is_set():
                print("a warning from a thread")
        except Exception as err:  # what the test looks for
            failures.append(repr(err))

    threads = [threading.Thread(target=chatter) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for i in range(200):
            with copy_output_to(tmp_path / "train.log"):
                print("the run's line", i)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert (tmp_path / "train.log").read_text().count("the run's line") == 200


def test_a_forked_command_starts_with_the_signal_handling_of_a_fresh_interpreter(tmp_path):
    """The suite's commands are forked from a preloaded process (tests/preloaded_cli.py);
    what happens on a signal, or on a write to a closed pipe, must be what a user's
    `rigtrain` gets from a new interpreter, or a test proves the wrong thing."""
    script = tmp_path / "dispositions.py"
    script.write_text(
        "import signal\n"
        "for name in ('SIGPIPE', 'SIGTERM', 'SIGHUP', 'SIGINT', 'SIGUSR1', 'SIGCHLD'):\n"
        "    handler = signal.getsignal(getattr(signal, name))\n"
        "    print(name, {signal.SIG_IGN: 'ignored', signal.SIG_DFL: 'default'}.get(handler, handler))\n"
    )
    fresh = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    forked = run_script(script, timeout=60)
    assert fresh.returncode == forked.returncode == 0, fresh.stderr + forked.stderr
    assert "SIGPIPE ignored" in fresh.stdout  # the premise: Python ignores it
    assert forked.stdout == fresh.stdout


def test_a_forked_command_that_ends_before_its_start_is_read_answers_at_once(monkeypatch):
    """The server answers each command with two lines, its process id and its exit code. A
    buffered reader took both into its buffer when the command ended before the first was
    read, and select() on the pipe then waited out the whole timeout for a line already in
    hand (a `train --config missing.toml` "hung" 120 s in one suite run)."""

    send = PreloadedCli._send

    def slow_to_read(server, request):
        send(server, request)
        time.sleep(1.0)  # the command ends meanwhile: both lines wait in the pipe

    monkeypatch.setattr(PRELOADED, "_send", slow_to_read)  # this worker's server, already started
    started = time.monotonic()
    result = run_cli("--version", timeout=20)
    assert result.returncode == 0 and result.stdout.startswith("rigtrain "), result
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "argv, command",
    [
        (["data", "prepare", "videos", "shards", "--out", "runs/x"], "rigtrain data prepare"),
        (["train", "--stpes", "100"], "rigtrain train"),
        (["profile", "analyze", "a.json", "b.json"], "rigtrain profile analyze"),
        (["rig", "--json", "extra"], "rigtrain rig"),
    ],
)
def test_a_word_no_option_takes_points_to_the_help_of_the_command_it_was_given_to(argv, command):
    """`rigtrain data prepare SRC OUT --out X` said "see rigtrain --help", whose help lists no
    option of `data prepare`."""
    result = run_cli(*argv)
    assert_user_error(result, f"{command}: error: unrecognized arguments:", f"(see {command} --help)")


# A process with two children in sessions of their own (as training ranks and sweep trials
# are), each with a child of its own in yet another session (a trial's ranks), that waits in
# terminal.pausing_together until it has been paused and continued.
PAUSING = r"""
import signal, subprocess, sys, time
import psutil
from rigtrain.terminal import pausing_together
looping = "import time\nwhile True: time.sleep(0.01)"
child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {looping!r}], start_new_session=True)"
child += "; time.sleep(60)"
kids = [subprocess.Popen([sys.executable, "-c", child], start_new_session=True) for _ in range(2)]
# ready once both grandchildren run their loop: one caught between its fork and its exec
# holds its parent in vfork's wait (state D), where a SIGSTOP cannot stop it until it goes on.
# The loop's program as a grandchild's whole last argument: a child's own -c program holds
# the loop's text too, and so does a grandchild's before its exec (a copy of its parent).
def looping_grandchildren():
    found = 0
    for p in psutil.Process().children(recursive=True):
        try:
            found += p.cmdline()[-1:] == [looping]
        except psutil.Error:
            pass
    return found
while len(psutil.Process().children(recursive=True)) < 4 or looping_grandchildren() < 2:
    time.sleep(0.01)
def hang_up(signum, frame):  # as the sweep's handler does
    raise KeyboardInterrupt("SIGHUP")


signal.signal(signal.SIGHUP, hang_up)
paused = []
try:
    with pausing_together(lambda n: f"paused with {n}", on_continue=paused.append, children=sys.argv[1] != "alone"):
        print("ready", flush=True)
        while not paused:
            time.sleep(0.01)
except KeyboardInterrupt:
    paused.append("hung up")
below = psutil.Process().children(recursive=True)
how = paused[0] if isinstance(paused[0], str) else f"after {paused[0]:.2f} s"
print(f"continued {how};", sorted(p.status() for p in below), flush=True)
for p in below:
    p.kill()
"""


@pytest.mark.parametrize("children", ["children", "alone", "hangup"])
def test_ctrl_z_pauses_every_process_below_and_fg_continues_them(tmp_path, children):
    """Ctrl-Z reaches only the process in the terminal's foreground; the ranks and trials it
    started in their own sessions must stop with it, and go on with it. A tune's workers go
    on (children=False): a pause would be measured as slowness. A terminal closed under the
    stopped job (SIGHUP, then SIGCONT) whose handler raises still leaves none stopped."""
    import psutil

    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING, children], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    below = []
    try:
        assert process.stdout.readline().strip() == "ready"
        below = psutil.Process(process.pid).children(recursive=True)
        assert len(below) == 4
        process.send_signal(signal.SIGTSTP)
        deadline = time.monotonic() + 30
        while psutil.Process(process.pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.02)
        # SIGSTOP takes effect when a process is next scheduled: on a loaded machine a child
        # may show as stopped a moment after the parent
        want = [children != "alone"] * 4
        stopped = [p.status() == psutil.STATUS_STOPPED for p in below]
        while stopped != want and time.monotonic() < deadline:
            time.sleep(0.02)
            stopped = [p.status() == psutil.STATUS_STOPPED for p in below]
        assert stopped == want
        time.sleep(0.5)
        if children == "hangup":
            process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGCONT)  # what `fg` sends
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        for child in below:  # in sessions of their own, maybe stopped: a failed check leaves none behind
            with contextlib.suppress(psutil.Error):
                child.kill()
    assert "paused with 4" in err, err
    said, statuses = out.strip().split(";")
    if children == "hangup":
        assert said == "continued hung up"
    else:  # how long they were paused (a sweep's budget grows by it)
        assert float(said.split()[-2]) >= 0.5
    assert "stopped" not in statuses, statuses
