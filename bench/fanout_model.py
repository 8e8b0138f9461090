"""A model of the fan-out at fleet sizes this machine cannot hold (issue 25): direct push against the swarm for
100 and 1,000 hosts at 10 and 25 Gbit/s links, a 6.1 GB env (the production env's size), next to the physical
bound. `python -m bench.fanout_model` prints it with the factor calibrated by the last `make bench-fanout`;
the bench prints it with the factor of its own run.

- direct push: the control node's uplink is shared by every host: N*S/u_control;
- swarm: the seed is sent the env (S/u_control), then the other N-1 hosts fetch it from each other; that phase
  is bounded by one host's downlink (S/d_host) and by the N-1 copies over every host's uplink, seed included
  ((N-1)*S/(N*u_host)), times FACTOR: what piece exchange, pipelining and the step's own work (peers'
  containers, hashing, the store's checks) cost over the bound, calibrated on the rehearsal fleet;
- bound: max(S/u_control, S/d_host, N*S/(u_control + N*u_host)): no way of sending is faster.
"""

from __future__ import annotations

ENV_BYTES = 6.1e9
FLEETS = (100, 1000)
LINKS_GBIT = (10, 25)
FACTOR = 1.38  # `make bench-fanout`, 2026-12-07: 1.38 at 8 hosts, 0.99 at 16 (the larger taken)


def bound(size: float, hosts: int, u_control: float, d_host: float, u_host: float) -> float:
    """Seconds no way of sending SIZE bytes to HOSTS hosts can beat (rates in bytes/s)."""
    return max(size / u_control, size / d_host, hosts * size / (u_control + hosts * u_host))


def direct(size: float, hosts: int, u_control: float) -> float:
    return hosts * size / u_control


def swarm(size: float, hosts: int, u_control: float, d_host: float, u_host: float, factor: float) -> float:
    """The seed's own transfer, then the swarm phase at FACTOR times its bound."""
    phase = max(size / d_host, (hosts - 1) * size / (hosts * u_host)) if hosts > 1 else 0.0
    return size / u_control + factor * phase


def overhead_factor(hosts: int, size: float, direct_s: float, fanout_s: float, idle_s: float) -> float:
    """FACTOR from one measured pair of upgrades on one machine, where every link is one shared pipe (the CPUs
    that run all ends): its rate C is what the direct run moved (HOSTS*SIZE) in the time it took over a deploy
    with nothing new (IDLE_S); the swarm phase took the fan-out run's time over that and the seed's SIZE/C, and
    its bound there is the (HOSTS-1)*SIZE copies at C."""
    rate = hosts * size / (direct_s - idle_s)
    phase = fanout_s - idle_s - size / rate
    return phase / ((hosts - 1) * size / rate)


def table(factor: float) -> list[str]:
    lines = ["| hosts | link Gbit/s | direct push s | swarm s | bound s | swarm / bound | direct / swarm |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for hosts in FLEETS:
        for gbit in LINKS_GBIT:
            rate = gbit * 1e9 / 8
            pushed = direct(ENV_BYTES, hosts, rate)
            swarmed = swarm(ENV_BYTES, hosts, rate, rate, rate, factor)
            least = bound(ENV_BYTES, hosts, rate, rate, rate)
            lines.append(f"| {hosts:,} | {gbit} | {pushed:,.0f} | {swarmed:,.1f} | {least:,.1f} | "
                         f"{swarmed / least:.2f} | {pushed / swarmed:,.0f} |")
    return lines


def report(factor: float) -> None:
    print(f"\nmodel: {ENV_BYTES / 1e9:.1f} GB env, every link (control and hosts, up and down) at the given "
          f"rate, swarm phase at {factor:.2f}x its bound\n")
    print("\n".join(table(factor)))


if __name__ == "__main__":
    report(FACTOR)
