"""asympo.lifetime on bare processes: a child ends when the process it watches dies, however it dies, and
a reaper ends a service tree its owner left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from asympo.lifetime import alive, child_env

PY = sys.executable


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_alive_sees_a_zombie_as_dead():
    child = subprocess.Popen([PY, "-c", "pass"])
    deadline = time.monotonic() + 30
    while alive(child.pid) and time.monotonic() < deadline:  # exited, not reaped: a zombie
        time.sleep(0.05)
    assert not alive(child.pid) and child.poll() == 0  # reaped only now
    assert alive(os.getpid())


def test_a_child_started_with_child_env_ends_when_its_launcher_is_sigkilled():
    """launcher -> child (its own session, as torchrun's ranks are): SIGKILL the launcher; the child, which
    ignores nothing and sleeps, takes SIGTERM from its watchdog within a second."""
    launcher_code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from asympo.lifetime import child_env
        code = "from asympo.lifetime import exit_with_launcher as w; w(); import time; time.sleep(600)"
        child = subprocess.Popen([{PY!r}, "-c", code], env=child_env(), start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(600)
        """
    )
    launcher = subprocess.Popen([PY, "-c", launcher_code], stdout=subprocess.PIPE, text=True, env=child_env())
    child = int(launcher.stdout.readline())
    assert alive(child)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert wait_gone(child, 5), "the child outlived its launcher"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace():
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        from asympo.lifetime import exit_with
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        exit_with(int(sys.argv[1]), grace=1.0, poll=0.1)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([PY, "-c", "import time; time.sleep(600)"])
    child = subprocess.Popen([PY, "-c", code, str(parent.pid)])
    time.sleep(1.0)  # the watchdog is up
    assert child.poll() is None
    parent.kill()
    parent.wait()
    assert child.wait(timeout=10) == -signal.SIGKILL


def test_the_reaper_ends_a_service_tree_its_owner_left_behind():
    """An owner starts a 'service' (with a child of its own, as raylet has workers) and a reaper; SIGKILL of
    the owner must take the whole service tree down."""
    owner_code = textwrap.dedent(
        f"""
        import os, subprocess, time
        from asympo.lifetime import children, reap_when_gone
        sleeper = [{PY!r}, "-c", "import time; time.sleep(600)"]
        inner = f"import subprocess, time; subprocess.Popen({{sleeper!r}}); time.sleep(600)"
        service = subprocess.Popen([{PY!r}, "-c", inner, "fake-service"])
        time.sleep(0.5)
        reap_when_gone(os.getpid(), children(os.getpid(), marker="fake-service"))
        print(service.pid, flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen([PY, "-c", owner_code], stdout=subprocess.PIPE, text=True)
    service = int(owner.stdout.readline())
    deadline, workers = time.monotonic() + 30, []
    while not workers and time.monotonic() < deadline:
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and parent_of(int(p)) == service]
        time.sleep(0.05)
    worker = workers[0]
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert wait_gone(service, 10) and wait_gone(worker, 10), "the service tree outlived its owner"


def test_a_clean_owner_exit_leaves_the_reaper_nothing_to_do_and_it_leaves():
    owner_code = textwrap.dedent(
        f"""
        import os, subprocess
        from asympo.lifetime import children, reap_when_gone
        service = subprocess.Popen([{PY!r}, "-c", "import time; time.sleep(1)", "fake-service"])
        reap_when_gone(os.getpid(), children(os.getpid(), marker="fake-service"))
        print(os.getpid(), flush=True)
        service.wait()
        """
    )
    done = subprocess.run([PY, "-c", owner_code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # the census fixture checks that the reaper, which carries this test's marker, left too


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except OSError:
        return -1
