"""Workers dealt into groups (EASGD-Tree's local centers, LSGD's local leaders).

The default group is a device group: workers whose devices talk to each other cheaply. On GPUs
that is the GPUs of one NUMA node (which is also, on most boxes, one PCIe root complex), read
from sysfs where it can be; where it cannot, or the nodes hold unequal numbers of workers, half
the workers. On CPUs, 2 (1 when the number of workers is odd).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .base import Option

def _numa_node(device: str) -> int | None:
    try:
        import torch

        index = int(device.partition(":")[2] or 0)
        props = torch.cuda.get_device_properties(index)
        bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        node = int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text())
        return node if node >= 0 else None
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None


def default_group_size(config: Any) -> int:
    workers, devices = config.workers, config.worker_devices
    if all(d == "cpu" for d in devices):
        return 2 if workers % 2 == 0 else 1
    nodes = [_numa_node(d) for d in devices]
    if None not in nodes:
        sizes = set(Counter(nodes).values())
        if len(sizes) == 1:
            size = sizes.pop()
            if workers % size == 0:
                return size
    half = max(1, workers // 2)
    return half if workers % half == 0 else 1


GROUP_SIZE = Option("group_size", int, "Workers per group; it must divide --workers.",
                    default=default_group_size, bounds=">= 1",
                    default_text="a device group: the GPUs under one NUMA node, else half the "
                                 "workers; 2 on CPUs (1 with an odd number of workers)")


def group_size(config: Any) -> int:
    """The resolved --group-size (resolve_options), checked against the workers."""
    size = config.resolved_options["group_size"]
    if config.workers % size:
        raise ConfigError(f"--group-size {size} does not divide the {config.workers} workers")
    return size


def group_of(rank: int, group_size: int) -> int:
    return rank // group_size


def members(group: int, group_size: int) -> range:
    return range(group * group_size, (group + 1) * group_size)
