"""Process-level CPU settings that must be made before torch is imported (called by the CLIs' entry points)."""

from __future__ import annotations

import os
import sys


def prefer_passive_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    A swarm on one machine runs several torch processes (servers, gateway) that compute in turn. With OpenMP's
    default spin-waiting, a process that has just finished its step keeps its cores busy while the next process
    needs them: measured here on 2 cores, a 30-block SmolLM2 decode step took 300-1000 ms next to a spinning
    neighbour and 45 ms with OMP_WAIT_POLICY=PASSIVE.
    """
    if "torch" in sys.modules:  # too late: the OpenMP runtime read its settings when torch loaded
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
