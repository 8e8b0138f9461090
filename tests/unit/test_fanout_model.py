"""The fan-out model's arithmetic (bench/fanout_model.py), on round numbers."""

import pytest

from bench.fanout_model import bound, direct, overhead_factor, swarm, table

GB = 1e9


def test_the_bound_is_one_hosts_downlink_when_the_hosts_uplinks_dominate():
    # 100 hosts' 1 GB/s uplinks carry the 100 copies in 5.9 s: a host's 0.5 GB/s downlink (12 s) binds.
    assert bound(6 * GB, 100, 1 * GB, 0.5 * GB, 1 * GB) == pytest.approx(6 / 0.5)


def test_the_bound_is_the_control_uplink_when_it_is_the_slowest_link():
    assert bound(6 * GB, 100, 0.1 * GB, 1 * GB, 1 * GB) == pytest.approx(60)


def test_the_bound_is_the_fleets_total_uplink_when_hosts_upload_slowly():
    # 100 copies of 1 GB over 1 + 100 * 0.01 GB/s of uplinks: 50 s, more than either single link's 1 s.
    assert bound(1 * GB, 100, 1 * GB, 1 * GB, 0.01 * GB) == pytest.approx(100 / 2)


def test_direct_push_shares_the_control_uplink_among_all_hosts():
    assert direct(6 * GB, 1000, 1 * GB) == pytest.approx(6000)


def test_the_swarm_is_the_seeds_transfer_then_its_phase_at_the_factor():
    # Seed: 6 s; phase bound: max(6 s downlink, 99 copies over 100 uplinks = 5.94 s) = 6 s; factor 1.5: 9 s.
    assert swarm(6 * GB, 100, 1 * GB, 1 * GB, 1 * GB, 1.5) == pytest.approx(6 + 9)
    assert swarm(6 * GB, 1, 1 * GB, 1 * GB, 1 * GB, 1.5) == pytest.approx(6)


def test_the_factor_is_the_swarm_phase_over_its_bound_on_one_shared_pipe():
    # 8 hosts, 1 GB each: direct 8 GB in 80 s over a 20 s idle deploy moves 8/60 GB/s; the seed's 1 GB then
    # takes 7.5 s, so a 132.5 s fan-out run leaves 105 s for the 7 copies that would take 52.5 s: factor 2.
    assert overhead_factor(8, 1 * GB, 80, 132.5, 20) == pytest.approx(2)


def test_the_table_has_a_row_for_each_fleet_size_and_link():
    rows = table(1.0)[2:]
    assert len(rows) == 4 and rows[0].startswith("| 100 | 10 | 488 |")
