"""Children forked from the night's zygote (golden_records/zygote.py) behave as the
programs they replace: their module runs as ``python -m`` would, on their own pipes,
their exit status and error come back, they can be stopped, and neither they nor
the zygote hold anything of the run's but what they were given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mdm_pipeline.golden_records import zygote
from mdm_pipeline.golden_records.snapshot_child import child_answer, stop_child

pytestmark = pytest.mark.skipif(not zygote.available(), reason="fork, fd passing and pidfds")

PROBE = """
import json, os, sys
mode = sys.argv[1]
if mode == "echo":
    lines = []
    for line in sys.stdin:
        if line.strip() == "end":
            break
        lines.append(line.strip())
    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    answer = {"lines": lines, "argv": sys.argv[1:], "name": __name__, "fds": fds}
    print(json.dumps(answer), flush=True)
elif mode == "fail":
    sys.stderr.write("ValueError\\n")
    sys.exit(3)
elif mode == "raise":
    raise KeyError("a stored value")
elif mode == "wait":
    sys.stdin.readline()
"""


@pytest.fixture
def forking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[zygote.Zygote]:
    """A zygote that can run the probe module, started while this process holds a file open."""
    (tmp_path / "zygote_probe.py").write_text(PROBE)
    # The forking process is a program of its own: it finds the probe on its path.
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    with open(tmp_path / "held", "w"):
        started = zygote.Zygote.start()
        assert started is not None
        try:
            yield started
        finally:
            started.close()


def test_a_forked_child_runs_its_module_as_a_program_on_its_own_pipes(
    forking: zygote.Zygote,
) -> None:
    child = forking.spawn("zygote_probe", ["echo", "x"], stdin=True)
    assert child is not None
    child.stdin.write("first\nsecond\nend\n")
    child.stdin.flush()
    answer, reason = child_answer(child)
    assert reason == "" and answer is not None
    assert answer["lines"] == ["first", "second"] and answer["argv"] == ["echo", "x"]
    assert answer["name"] == "__main__"
    # Its standard streams and the listing's own descriptor: nothing of this
    # process's (its open file, its store, its sockets) came with the fork.
    assert len(answer["fds"]) == 4 and answer["fds"][:3] == [0, 1, 2]
    assert child.wait() == 0
    stop_child(child, None)


def test_a_failed_child_s_status_and_reason_come_back(forking: zygote.Zygote) -> None:
    child = forking.spawn("zygote_probe", ["fail"], stdin=False)
    assert child is not None and child.stdin is None
    assert child_answer(child) == (None, "ValueError")
    assert child.returncode == 3
    # An error it did not catch ends it as an interpreter would: the class alone.
    raised = forking.spawn("zygote_probe", ["raise"], stdin=False)
    assert raised is not None
    assert child_answer(raised) == (None, "KeyError")
    assert raised.returncode == 1


def test_a_child_is_stopped_and_its_end_known(forking: zygote.Zygote) -> None:
    child = forking.spawn("zygote_probe", ["wait"], stdin=True)
    assert child is not None
    time.sleep(0.2)
    assert child.poll() is None  # waiting for its input
    stop_child(child, None)
    assert child.returncode == -9
    assert not Path(f"/proc/{child.pid}").exists() or _zombie_or_gone(child.pid)


def test_a_child_s_end_is_known_while_a_later_child_still_runs(forking: zygote.Zygote) -> None:
    """A child forked later holds nothing of an earlier one's: the earlier one's exit
    status comes as it ends, not when the later one ends too (a night's scope read
    was collected while the return files' child still waited for its inputs)."""
    first = forking.spawn("zygote_probe", ["wait"], stdin=True)
    later = forking.spawn("zygote_probe", ["echo", "later"], stdin=True)
    assert first is not None and later is not None
    first.stdin.write("go\n")
    first.stdin.flush()
    with ThreadPoolExecutor(1) as pool:
        status = pool.submit(first.wait)
        try:
            assert status.result(timeout=10) == 0
        finally:
            later.kill()  # the wait, if it hangs, ends with the later child
    # The later child held its own pipes and the listing's only.
    stop_child(later, None)
    stop_child(first, None)


def _zombie_or_gone(pid: int) -> bool:
    """Reaped by the zygote a moment after its status was written."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def test_the_zygote_holds_only_its_socket_and_ends_when_closed(
    forking: zygote.Zygote,
) -> None:
    # Once it has answered a request, it is in its loop, its descriptors settled.
    failed = forking.spawn("zygote_probe", ["fail"], stdin=False)
    assert failed is not None and child_answer(failed) == (None, "ValueError")
    links = [
        os.readlink(f"/proc/{forking.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{forking.pid}/fd")
    ]
    # Its standard streams on the null device, its socket and its own wake-up pipe
    # (two ends): not this process's open file, nor anything else of it.
    assert sorted(link.split(":")[0] for link in links) == [
        *[os.devnull] * 3,
        "pipe",
        "pipe",
        "socket",
    ]
    forking.close()
    assert not Path(f"/proc/{forking.pid}").exists()
    # A closed zygote forks nothing: the caller starts the program instead.
    assert forking.spawn("zygote_probe", ["fail"], stdin=False) is None


def test_without_fork_there_is_no_zygote(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "pidfd_open")
    assert not zygote.available()
    assert zygote.Zygote.start() is None
    assert sys.platform.startswith("linux")


def test_a_process_with_threads_of_its_own_is_not_copied() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert not zygote.only_thread()
        started = zygote.Zygote.start()
        assert started is not None and not started.forked  # a program of its own
        started.close()
    finally:
        stop.set()
        worker.join()


_ALONE = """
import json, sys
from mdm_pipeline.golden_records import zygote
from mdm_pipeline.golden_records.snapshot_child import child_answer
alone = zygote.only_thread()
started = zygote.Zygote.start()
child = started.spawn("zygote_probe", ["echo", "x"], stdin=True)
child.stdin.write("line\\nend\\n")
child.stdin.flush()
answer, _ = child_answer(child)
started.close()
print(json.dumps({"alone": alone, "forked": started.forked, "answer": answer}))
"""


def test_a_process_running_alone_is_copied_and_its_copy_forks_children(
    tmp_path: Path,
) -> None:
    """As `mdm run` is at a night's start: in a process of its own, this one has
    threads (the test runner's)."""
    (tmp_path / "zygote_probe.py").write_text(PROBE)
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    done = subprocess.run(
        [sys.executable, "-c", _ALONE],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path), "OPENBLAS_NUM_THREADS": "1"},
        check=True,
    )
    got = json.loads(done.stdout)
    assert got["alone"] is True and got["forked"] is True
    assert got["answer"]["lines"] == ["line"] and got["answer"]["name"] == "__main__"
    # The copy closed what the run had open: the child has its three streams only.
    assert len(got["answer"]["fds"]) == 4
