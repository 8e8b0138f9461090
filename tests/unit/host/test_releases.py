"""Releases as the host reports them (files/host/releases.sh list) and how they are named."""

import json

from tasks.host.releases import ReleasesFact, new_release

IMAGE = "sha256:" + "ab" * 32


def listed(release, activated="2026-12-07T04:00:00Z", images=(("web", IMAGE),)) -> list[str]:
    return [f"release {release.id}", f"activated {activated}", "json " + json.dumps(release.record()),
            *(f"image {service} {image_id}" for service, image_id in images)]


def test_a_release_is_named_by_what_the_stack_runs_not_by_when_where_or_under_which_settings():
    first = new_release("shop", "f" * 64, "env-0123456789abcdef", {"org/m": "c" * 40}, {"web": "shop:1"}, "s" * 16)
    again = new_release("shop", "f" * 64, "env-0123456789abcdef", {"org/m": "c" * 40}, {"web": "shop:1"}, "s" * 16)
    other = new_release("shop", "f" * 64, "env-fedcba9876543210", {"org/m": "c" * 40}, {"web": "shop:1"}, "s" * 16)
    assert first.id == again.id != other.id and first.id.startswith("rel-") and len(first.id) == 20
    other_settings = new_release("shop", "f" * 64, "env-0123456789abcdef", {"org/m": "c" * 40}, {"web": "shop:1"},
                                 "t" * 16)
    assert other_settings.id == first.id  # a directory's mode or a hash check changes no release


def test_the_host_listing_reads_back_whole_releases_in_activation_order_and_the_current_one():
    old = new_release("shop", "1" * 64, None, {}, {"web": "shop:1"}, "s" * 16)
    new = new_release("shop", "2" * 64, None, {}, {"web": "shop:2"}, "s" * 16)
    state = ReleasesFact().process([*listed(new, "2026-12-07T05:00:00Z"), *listed(old), f"current {new.id}"])
    assert list(state.releases) == [old.id, new.id] and state.current == new.id
    assert state.previous().id == old.id and state.releases[new.id].image_ids == {"web": IMAGE}
    assert state.releases[old.id].images == {"web": "shop:1"} and state.releases[old.id].env is None


def test_what_does_not_read_back_whole_is_left_out():
    good = new_release("shop", "1" * 64, None, {}, {}, "s" * 16)
    forged = new_release("shop", "2" * 64, None, {}, {}, "s" * 16)
    lines = [*listed(good, images=(("web", "not-an-id"),)),
             f"release {forged.id}", "json {\"id\": \"rel-0000000000000000\"}",  # a record naming another id
             "release ../../etc", "json {}", "current rel-ffffffffffffffff"]  # a current that is not kept
    state = ReleasesFact().process(lines)
    assert list(state.releases) == [good.id] and state.releases[good.id].image_ids == {}
    assert state.current is None and state.previous().id == good.id
