"""What the HF endpoint answers is checked at the boundary, before it is cached or used."""

import json

import pytest

from tasks.config import ModelSpec
from tasks.control.hub import ModelError, checked_commit, entries_of, listed_file_problem

SPEC = ModelSpec(repo_id="org/model", revision="main")
GOOD = {"size": 7, "blob_id": "ab" * 20}


def listing(path: str, info: dict) -> str:
    return json.dumps({"format_version": 1, "files": {"README.md": GOOD, path: info}})


@pytest.mark.parametrize("answer", ["abc", "A" * 40, "0" * 39 + ";", "$(reboot)" + "0" * 31, None, 42, "0" * 41])
def test_a_revision_resolved_to_something_other_than_a_commit_is_refused(answer):
    with pytest.raises(ModelError, match=r"which is not a commit \(40 hex digits\); refusing it"):
        checked_commit(answer, SPEC)
    assert checked_commit("0123456789abcdef" * 2 + "01234567", SPEC) == "0123456789abcdef" * 2 + "01234567"


@pytest.mark.parametrize(("path", "info", "problem"), [
    ("../escape", GOOD, "outside the repo folder"),
    ("/etc/passwd", GOOD, "outside the repo folder"),
    ("a/../../b", GOOD, "outside the repo folder"),
    ("a\\b", GOOD, "outside the repo folder"),
    ("red\x1b[31m.txt", GOOD, "control characters"),
    ("two\nlines", GOOD, "control characters"),
    ("rtl\u202etxt.exe", GOOD, "control characters"),
    ("x" * 1025, GOOD, "too long"),
    ("ok.bin", {"size": "12", "blob_id": "ab" * 20}, "not a byte count"),
    ("ok.bin", {"size": -1, "blob_id": "ab" * 20}, "not a byte count"),
    ("ok.bin", {"size": True, "blob_id": "ab" * 20}, "not a byte count"),
    ("ok.bin", {**GOOD, "lfs_size": 1.5, "lfs_sha256": "cd" * 32}, "not a byte count"),
    ("ok.bin", {"size": 1, "blob_id": "xyz"}, "malformed blob id"),
    ("ok.bin", {**GOOD, "lfs_size": 3, "lfs_sha256": "../../etc"}, "malformed sha256"),
    ("ok.bin", ["not", "a", "mapping"], "not a mapping"),
])
def test_a_listing_with_any_bad_entry_is_refused_whatever_the_patterns_select(path, info, problem):
    assert problem in listed_file_problem(path, info)
    only_readme = ModelSpec(repo_id="org/model", allow_patterns=["README.md"])
    with pytest.raises(ModelError, match="refusing this revision") as refused:
        entries_of(listing(path, info), only_readme)
    assert "\x1b" not in str(refused.value) and "\n" not in str(refused.value)  # shown escaped, never raw


def test_a_good_listing_gives_its_entries():
    lfs = {"size": 133, "blob_id": "ab" * 20, "lfs_sha256": "cd" * 32, "lfs_size": 5000}
    entries = entries_of(listing("weights/model.safetensors", lfs), SPEC)
    assert [(entry.path, entry.blob, entry.size) for entry in entries] == [
        ("README.md", "ab" * 20, 7), ("weights/model.safetensors", "cd" * 32, 5000)]


def test_an_unreachable_endpoint_is_not_proof_that_the_repo_is_unknown():
    """A connection refused comes through huggingface_hub as its HTTP client's own ConnectError (not an
    HfHubHTTPError); `request_errors` catches it without this package naming the client."""
    import socket

    from huggingface_hub.utils import httpx

    from tasks.control.hub import repo_exists, request_errors

    with socket.socket() as closed:  # a port nothing listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        with pytest.raises(request_errors(httpx)):
            from huggingface_hub import HfApi

            HfApi(endpoint=endpoint, token=False).repo_info(SPEC.repo_id)
        assert repo_exists(SPEC, endpoint) is True
