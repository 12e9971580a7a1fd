"""The Ray seam: start or join Ray, run a function on N Ray Train workers.

Ray starts in-process on this machine by default; ``RAY_ADDRESS`` joins a cluster instead
(KubeRay RayCluster / RayJob at scale, see infra/). Resources are sized explicitly so that nothing
waits for CPUs that do not exist.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

if not os.environ.get("RAY_ADDRESS"):
    # Loopback only: an in-process Ray serves this machine, so it should not listen on the network.
    # Ray reads this flag at import (it names Windows/macOS, where loopback is its default) and then
    # binds its node to 127.0.0.1 instead of the machine's outward address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard (loopback only) also serves the state API that Ray Train polls to clean up.
        ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=True, configure_logging=False)


def run_workers(fn: Callable[[dict], Any], config: dict, *, num_workers: int, cpus_per_worker: int,
                storage_path: str | Path, name: str) -> Any:
    """Run ``fn(config)`` on ``num_workers`` Ray Train workers (the process group is gloo on CPU, NCCL on GPU).

    Returns the Ray Train ``Result``; raises if training failed.
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(max(os.cpu_count() or 1, num_workers * cpus_per_worker))
    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=2)),
    )
    return trainer.fit()


def average_gradients(params) -> None:
    """Data-parallel gradient averaging across the Ray Train process group (gloo on CPU, NCCL on GPU).

    Our losses call sub-modules (encoders, decoder) directly rather than one ``forward``, which a DDP
    wrapper would need to see to sync; an explicit all-reduce after ``backward`` gives the same update.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for q in params:
        if q.grad is not None:
            dist.all_reduce(q.grad)
            q.grad /= world
