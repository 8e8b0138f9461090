"""The deploy lock's host command, run with /bin/sh: one holder at a time, the next one told who holds it."""

import subprocess

from tasks.host import lock


def test_the_second_taker_is_refused_with_the_holder_and_the_lock_goes_with_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "LOCK_FILE", str(tmp_path / "run" / "deploy.lock"))
    first = subprocess.Popen(["sh", "-c", lock.lock_command("ci@ctl pid 7 since T", sudo=False)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == lock.LOCKED
        second = subprocess.run(["sh", "-c", lock.lock_command("other", sudo=False)], input="",
                                capture_output=True, text=True, timeout=10)
        assert second.stdout.strip() == "held by ci@ctl pid 7 since T"
    finally:
        first.stdin.close()  # what a closed SSH channel does to the holder
        assert first.wait(timeout=10) == 0
    third = subprocess.run(["sh", "-c", lock.lock_command("next", sudo=False)], input="",
                           capture_output=True, text=True, timeout=10)
    assert third.stdout.strip() == lock.LOCKED
