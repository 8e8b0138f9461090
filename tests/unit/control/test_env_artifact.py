"""ML env artifact: recipe and content ids, safe repack of a user site, import names from dist-info."""

import hashlib
import io
import json
import re
import tarfile

import pytest

from tasks.config import RequirementsError, requirement_names
from tasks.control.env_artifact import ENV_INFO, ArtifactError, Manifest, check_artifact, recipe_id, repack_user_site
from tasks.control.env_build import shown_pip_line
from tasks.secrets import public_url

SITE = ".local/lib/python3.11/site-packages"
REQUIREMENTS = "# ML env\npyyaml>=6\ntokenizers  # rust\n--index-url http://index/simple/\n"


def user_site_tar(extra=(), chunk=1000) -> list[bytes]:
    """A tar stream shaped like `container.get_archive('/root/.local')`, in chunks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        def add(name, data=b"", **attrs):
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            if info.isfile():
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)

        add(".local", type=tarfile.DIRTYPE, mode=0o755)
        add(f"{SITE}/yaml/__init__.py", b"x = 1\n")
        add(f"{SITE}/_yaml/__init__.py", b"")
        add(f"{SITE}/PyYAML-6.0.4.dist-info/METADATA", b"Metadata-Version: 2.1\nName: PyYAML\nVersion: 6.0.4\n")
        add(f"{SITE}/PyYAML-6.0.4.dist-info/top_level.txt", b"_yaml\nyaml\n")
        add(f"{SITE}/tokenizers/__init__.py", b"")
        add(f"{SITE}/tokenizers-0.23.3.dist-info/METADATA", b"Name: tokenizers\nVersion: 0.23.3\n")
        add(f"{SITE}/tokenizers-0.23.3.dist-info/RECORD",
            b"tokenizers/__init__.py,sha256=x,1\ntokenizers-0.23.3.dist-info/RECORD,,\n../../../bin/tk,sha256=y,2\n")
        add(".local/bin/yaml-tool", b"#!/bin/sh\n", mode=0o755, uid=1234)
        add(".local/bin/tk", type=tarfile.SYMTYPE, linkname="yaml-tool")
        for args in extra:
            add(*args[:2], **args[2]) if len(args) == 3 else add(*args)
    data = buffer.getvalue()
    return [data[i:i + chunk] for i in range(0, len(data), chunk)]


def repack(tmp_path, extra=(), chunk=1000, requirements=REQUIREMENTS, base="sha256:aa"):
    """The manifest and artifact of the user site USER_SITE_TAR(EXTRA) repacked into TMP_PATH."""
    manifest = repack_user_site(user_site_tar(extra, chunk), tmp_path, requirements, base, "linux/amd64")
    return manifest, tmp_path / f"{manifest.env_id}.tar.gz"


def test_recipe_id_is_stable_and_changes_with_each_input():
    base = recipe_id(REQUIREMENTS, "sha256:aa", "linux/amd64", {"index_url": "http://i/simple/"})
    assert base == recipe_id(REQUIREMENTS, "sha256:aa", "linux/amd64", {"index_url": "http://i/simple/"})
    assert base.startswith("recipe-") and len(base) == 23
    assert len({
        base,
        recipe_id(REQUIREMENTS + "openai\n", "sha256:aa", "linux/amd64", {"index_url": "http://i/simple/"}),
        recipe_id(REQUIREMENTS, "sha256:bb", "linux/amd64", {"index_url": "http://i/simple/"}),
        recipe_id(REQUIREMENTS, "sha256:aa", "linux/arm64", {"index_url": "http://i/simple/"}),
        recipe_id(REQUIREMENTS, "sha256:aa", "linux/amd64", {"index_url": "http://j/simple/"}),
    }) == 5


def test_index_credentials_change_neither_the_id_nor_what_is_shown():
    with_token = {"index_url": "https://user:s3cret-token@pypi.corp:8443/simple/", "extra_index_urls": ["https://t0k@x.org/s/"]}
    without = {"index_url": "https://pypi.corp:8443/simple/", "extra_index_urls": ["https://x.org/s/"]}
    assert recipe_id("a\n", "b", "c", with_token) == recipe_id("a\n", "b", "c", without)
    assert public_url("https://user:s3cret-token@pypi.corp:8443/simple/") == "https://pypi.corp:8443/simple/"


def test_requirement_names_are_canonical_and_an_empty_file_is_refused():
    assert requirement_names(REQUIREMENTS) == ["pyyaml", "tokenizers"]
    assert requirement_names("Sentence_Transformers[train]>=4.1 ; python_version>'3'\n") == ["sentence-transformers"]
    with pytest.raises(RequirementsError, match="names no package"):
        requirement_names("# nothing\n\n")
    with pytest.raises(RequirementsError, match=r"requirements line 2: 'torch>=>2'"):
        requirement_names("numpy\ntorch>=>2\n")


def test_repack_strips_the_root_normalises_owners_and_records_import_names(tmp_path):
    manifest, target = repack(tmp_path)
    assert manifest.imports == {"pyyaml": ["yaml"], "tokenizers": ["tokenizers"]}
    assert manifest.packages == {"pyyaml": "6.0.4", "tokenizers": "0.23.3"}
    manifest.write(tmp_path / "env-1.json")
    assert Manifest.read(tmp_path / "env-1.json") == manifest
    with tarfile.open(target) as archive:
        members = {member.name: member for member in archive.getmembers()}
    assert "lib/python3.11/site-packages/yaml/__init__.py" in members and ".local" not in members
    assert members["bin/yaml-tool"].uid == 0 and members["bin/yaml-tool"].mode & 0o777 == 0o755
    assert members["bin/tk"].linkname == "yaml-tool"
    assert manifest.files == 8 and manifest.size == target.stat().st_size
    assert manifest.sha256 == hashlib.sha256(target.read_bytes()).hexdigest()


def test_repack_applies_the_data_filters_modes(tmp_path):
    extra = [(f"{SITE}/yaml/setuid-tool", b"x", {"mode": 0o4777}), (f"{SITE}/shared", b"", {"mode": 0o666}),
             (f"{SITE}/open-dir", b"", {"type": tarfile.DIRTYPE, "mode": 0o3777})]
    _, target = repack(tmp_path, extra)
    with tarfile.open(target) as archive:
        modes = {member.name.rsplit("/", 1)[-1]: member.mode for member in archive.getmembers()}
        owners = {(member.uid, member.gid, member.uname, member.gname) for member in archive.getmembers()}
    assert (modes["setuid-tool"], modes["shared"], modes["open-dir"]) == (0o755, 0o644, 0o755)
    assert owners == {(0, 0, "root", "root")}


def test_the_same_content_repacks_to_the_same_bytes_and_id(tmp_path):
    first, _ = repack(tmp_path / "a")
    second, _ = repack(tmp_path / "b", chunk=77, requirements=REQUIREMENTS + "# reworded, same packages\n")
    assert (first.sha256, first.env_id) == (second.sha256, second.env_id)
    assert re.fullmatch(r"env-[0-9a-f]{16}", first.env_id)


def test_the_env_id_names_what_pip_installed_and_the_base_it_runs_on(tmp_path):
    """Two control nodes whose pip resolved one recipe differently get two ids, not one id for two contents."""
    ids = {repack(tmp_path / "first")[0].env_id}
    other_version = [(f"{SITE}/tokenizers-0.23.3.dist-info/METADATA", b"Name: tokenizers\nVersion: 0.23.4\n")]
    other_files = [(f"{SITE}/tokenizers-0.23.3.dist-info/RECORD", b"tokenizers/__init__.py,sha256=z,1\n")]
    one_more = [(f"{SITE}/idna-3.10.dist-info/METADATA", b"Name: idna\nVersion: 3.10\n")]
    for name, extra, base in (("version", other_version, "sha256:aa"), ("record", other_files, "sha256:aa"),
                              ("dependency", one_more, "sha256:aa"), ("base", (), "sha256:bb")):
        # a later member of one name replaces the earlier in the repacked dist-info, as tar extraction would
        ids.add(repack(tmp_path / name, extra, base=base)[0].env_id)
    assert len(ids) == 5


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ((".local/../../etc/cron.d/x", b"evil"),
         "archive member '.local/../../etc/cron.d/x' escapes the env directory"),
        (("/etc/passwd", b"evil"), "archive member '/etc/passwd' escapes the env directory"),
        (("other/file", b"x"), "archive member 'other/file' is outside .local/"),
        ((".local/bin/sh", b"", {"type": tarfile.SYMTYPE, "linkname": "/bin/sh"}),
         "archive member '.local/bin/sh' rejected"),
        ((".local/lib/up", b"", {"type": tarfile.SYMTYPE, "linkname": "../../../etc"}),
         "archive member '.local/lib/up' rejected"),
        ((".local/dev", b"", {"type": tarfile.CHRTYPE}), "archive member '.local/dev' rejected"),
    ],
)
def test_members_that_could_escape_the_target_are_rejected_and_nothing_is_left(tmp_path, member, message):
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(".", r"\.")):
        repack(tmp_path, [member])
    assert list(tmp_path.iterdir()) == []


def test_a_requirement_the_build_did_not_install_is_an_error(tmp_path):
    with pytest.raises(ArtifactError, match="the built env lacks openai"):
        repack(tmp_path, requirements=REQUIREMENTS + "openai\n")
    assert list(tmp_path.iterdir()) == []


def test_the_artifact_says_which_python_it_is_for_and_carries_what_the_host_check_imports(tmp_path):
    manifest, target = repack(tmp_path)
    assert manifest.python == "python3.11"
    with tarfile.open(target) as archive:
        info = json.loads(archive.extractfile(ENV_INFO).read())
    assert info == {"env_id": manifest.env_id, "python": "python3.11",
                    "imports": {"pyyaml": ["yaml"], "tokenizers": ["tokenizers"]}}
    check_artifact(target, manifest)  # what the build wrote passes the check before upload


def test_the_cuda_runtime_version_comes_from_its_dist_info(tmp_path):
    assert repack(tmp_path / "cpu")[0].cuda_runtime == ""
    # the METADATA of PyPI's nvidia-cuda-runtime-cu12 12.8.90 wheel, first lines; installed as a dependency
    runtime = [(f"{SITE}/nvidia_cuda_runtime_cu12-12.8.90.dist-info/METADATA",
                b"Metadata-Version: 2.1\nName: nvidia-cuda-runtime-cu12\nVersion: 12.8.90\nSummary: CUDA Runtime\n")]
    manifest, _ = repack(tmp_path / "cuda", runtime)
    assert manifest.cuda_runtime == "12.8.90"
    assert "nvidia-cuda-runtime-cu12" not in manifest.imports  # not a requirement: nothing to import-check


def test_what_torch_reports_is_checked_before_it_enters_the_manifest(tmp_path):
    manifest, _ = repack(tmp_path)
    # what files/torch_info.py printed on the lent H100 (torch 2.11.0+cu130)
    h100 = {"version": "2.11.0+cu130", "cuda": "13.0",
            "archs": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]}
    assert manifest.with_torch(h100).torch == h100
    assert manifest.with_torch({}).torch == {}
    assert manifest.with_torch({"version": "2.13.0+cpu", "cuda": None, "archs": []}).torch["cuda"] is None
    for bad in ({"version": "2.11", "cuda": "13.0", "archs": ["sm_90; rm -rf /"]}, {"version": 2, "archs": []},
                {"version": "2.11", "cuda": "thirteen", "archs": []}, {"version": "2.11", "cuda": "13.0"}):
        with pytest.raises(ArtifactError, match="torch reported"):
            manifest.with_torch(bad)


def test_a_cached_artifact_that_was_changed_or_escapes_is_refused(tmp_path):
    manifest, target = repack(tmp_path)
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        check_artifact(target, Manifest(**{**manifest.__dict__, "sha256": "0" * 64}))

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as archive:
        link = tarfile.TarInfo("lib/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        archive.addfile(link)
    data = evil.read_bytes()
    forged = Manifest("env-2", hashlib.sha256(data).hexdigest(), len(data), 0, 0, "python3.11", "", {})
    with pytest.raises(ArtifactError, match="archive member 'lib/escape' rejected"):
        check_artifact(evil, forged)


def test_an_old_manifest_is_reported_with_what_to_do(tmp_path):
    path = tmp_path / "env-1.json"
    path.write_text('{"env_id": "env-1"}')
    with pytest.raises(ArtifactError, match="not a manifest of this version.*remove it to rebuild"):
        Manifest.read(path)


def test_a_manifest_of_another_version_counts_as_not_cached_so_the_env_is_built_again(tmp_path):
    from tasks.control.env_build import cached_manifest

    (tmp_path / "env-1.tar.gz").write_bytes(b"x")
    (tmp_path / "env-1.json").write_text('{"env_id": "env-1", "sha256": "", "size": 1, "unpacked_size": 1, '
                                         '"files": 1, "python": "python3.11", "imports": {}}')  # before `cuda_runtime`
    assert cached_manifest(tmp_path, "env-1") is None
    (tmp_path / "env-1.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="is not a manifest .*remove it to rebuild"):
        cached_manifest(tmp_path, "env-1")


def test_index_credentials_are_expanded_only_into_pips_config(monkeypatch):
    from tasks.control.env_build import pip_conf

    monkeypatch.setenv("PIP_TOKEN", "hunter2")
    options = {"index_url": "https://ci:${PIP_TOKEN}@a.corp/simple/", "extra_index_urls": [], "find_links": [],
               "trusted_hosts": ["a.corp", "b.corp"]}
    assert pip_conf(options) == ("[global]\nindex-url = https://ci:hunter2@a.corp/simple/\n"
                                 "trusted-host = a.corp\n    b.corp\n")
    assert recipe_id("pyyaml\n", "sha256:x", "linux/amd64", options) == recipe_id(
        "pyyaml\n", "sha256:x", "linux/amd64", {**options, "index_url": "https://a.corp/simple/"})


def test_pip_lines_show_no_index_token_in_a_url_path_or_query(monkeypatch):
    monkeypatch.setenv("INDEX_TOKEN", "t0k/en+1")
    options = {"index_url": "https://pypi.corp/t/${INDEX_TOKEN}/simple/",
               "find_links": ["https://files.corp/wheels/?auth=${INDEX_TOKEN}"]}
    line = ("Looking in indexes: https://pypi.corp/t/t0k/en+1/simple/ ; "
            "links: https://files.corp/wheels/?auth=t0k%2Fen%2B1")
    assert shown_pip_line(line, options) == ("Looking in indexes: https://pypi.corp/t/***/simple/ ; "
                                             "links: https://files.corp/wheels/?auth=***")
