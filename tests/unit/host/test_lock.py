"""The deploy lock's host command, run with /bin/sh: one holder at a time, the next one told who holds it,
and only in a directory that the deploy's user alone can use."""

import os
import subprocess

import pytest

from tasks.host import lock


def take(who: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", lock.lock_command(who)], input="", capture_output=True, text=True, timeout=10,
                          **options)


def test_the_second_taker_is_refused_with_the_holder_and_the_lock_goes_with_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "LOCK_DIR", str(tmp_path / "mlstack"))
    first = subprocess.Popen(["sh", "-c", lock.lock_command("ci@ctl pid 7 since T")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == lock.LOCKED
        assert take("other").stdout.strip() == "held by ci@ctl pid 7 since T"
    finally:
        first.stdin.close()  # what a closed SSH channel does to the holder
        assert first.wait(timeout=10) == 0
    assert take("next").stdout.strip() == lock.LOCKED
    assert oct((tmp_path / "mlstack").stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("plant", ["link", "open mode", "file"])
def test_a_lock_directory_others_could_use_is_refused_and_nothing_is_opened_through_it(tmp_path, monkeypatch, plant):
    where, elsewhere = tmp_path / "mlstack", tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if plant == "link":
        where.symlink_to(elsewhere)
    elif plant == "open mode":
        where.mkdir()
        where.chmod(0o777)
    else:
        where.write_text("")
    monkeypatch.setattr(lock, "LOCK_DIR", str(where))
    answer = take("me").stdout.strip()
    assert answer.startswith(f"unsafe: {where} is not a directory that only ")
    assert list(elsewhere.iterdir()) == []  # nothing opened through a link
    assert not (where / "deploy.lock").exists() if plant == "open mode" else os.path.lexists(where)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the lock program as another user")
def test_a_deploy_that_is_not_root_is_told_to_work_as_root(tmp_path, monkeypatch):
    """A non-root `_sudo_user` cannot make root's lock directory: the host fails with what to do, not a hang."""
    monkeypatch.setattr(lock, "LOCK_DIR", str(tmp_path / "mlstack"))
    answer = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                             "sh", "-c", lock.lock_command("me")],
                            input="", capture_output=True, text=True, timeout=10).stdout.strip()
    assert answer == (f"unsafe: nobody cannot make {tmp_path / 'mlstack'}: "
                      "the deploy works as root (ssh as root, or --sudo)")
    assert not (tmp_path / "mlstack").exists()
