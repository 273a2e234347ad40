"""Each Slurm task's torch.distributed environment, computed from Slurm's variables alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from chimera.launch.slurm import RENDEZVOUS_PORTS, expand_nodelist, rendezvous, rendezvous_port


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("rack[1-2]-n[8-9]", ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
])
def test_nodelists_expand_as_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_a_task_of_a_two_node_job():
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_RESTART_COUNT": "2"}
    assert rendezvous(env) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                               "MASTER_ADDR": "gpu07", "MASTER_PORT": str(rendezvous_port(4242, 2))}


def test_rendezvous_ports_avoid_the_ephemeral_range_and_move_on_each_restart():
    """A store listening on a port of the kernel's ephemeral range fails (EADDRINUSE) whenever an outbound connection
    on the node holds that port: CI once lost a job's first start to that."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    ports = {(job, restart): rendezvous_port(job, restart) for job in range(1, 3000) for restart in range(4)}
    assert all(RENDEZVOUS_PORTS.start <= port < min(RENDEZVOUS_PORTS.stop, low) for port in ports.values())
    # jobs that share a node at the same time get different ports, and a restart never reuses its last one
    assert len({ports[job, 0] for job in range(1, 3000)}) == 2999
    assert all(ports[job, r] != ports[job, r + 1] for job in range(1, 3000) for r in range(3))
