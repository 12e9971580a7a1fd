"""The Ray seam: start or join Ray, run a function on N Ray Train workers.

Ray starts in-process on this machine by default; ``RAY_ADDRESS`` joins a cluster instead
(KubeRay RayCluster / RayJob at scale, see infra/). Resources are sized explicitly so that nothing
waits for CPUs that do not exist.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Start Ray in-process on loopback (``mmplatform.environment``), or join ``RAY_ADDRESS``."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        if ray_constants.ENABLE_RAY_CLUSTER:
            # Ray was imported before mmplatform, so it read the loopback flag (mmplatform.environment) before
            # it was set and would bind the node to the machine's outward address. Ray looks the constant up when
            # it picks the node's address, so setting it here still keeps this node on 127.0.0.1.
            ray_constants.ENABLE_RAY_CLUSTER = False
        # No dashboard by default: its server, head modules and agent took 3.7% of a core during training
        # steps, which on a 2-core machine stalls the 2-thread OpenMP team of the one worker (bench/README.md,
        # "Ray Train vs a plain loop": B/A 0.845 -> see there). MMP_RAY_DASHBOARD=1 starts it (loopback only).
        # Without it Ray Train v2's PlacementGroupCleaner cannot reach the state API; it only matters when the
        # controller dies without cleaning up, and the in-process Ray, placement groups included, ends with
        # this process anyway.
        dashboard = ray_dashboard()
        if not dashboard:
            # Metrics feed the dashboard (and a Prometheus scraping it); with none, exporting them is only cost.
            os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
        lean = not dashboard
        ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=True, configure_logging=False,
                 include_dashboard=dashboard, _system_config={"enable_metrics_collection": False} if lean else None,
                 runtime_env={"worker_process_setup_hook": "mmplatform.compute.quiet_cleaner"} if lean else None)


def quiet_cleaner() -> None:
    """Ray worker set-up hook when the dashboard is off: the PlacementGroupCleaner's liveness check goes
    through the state API, which the dashboard serves, so it would warn every second that it cannot reach it."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def ray_dashboard() -> bool:
    """Whether the local Ray starts its dashboard (``MMP_RAY_DASHBOARD=1``; default off)."""
    return os.environ.get("MMP_RAY_DASHBOARD", "0").strip().lower() in ("1", "true", "yes", "on")


def run_workers(fn: Callable[[dict], Any], config: dict, *, num_workers: int, cpus_per_worker: int,
                storage_path: str | Path, name: str, max_failures: int = 2) -> Any:
    """Run ``fn(config)`` on ``num_workers`` Ray Train workers (the process group is gloo on CPU, NCCL on GPU).

    ``num_workers=0``: Ray Train's local mode, ``fn`` runs in this process with no Ray cluster (the same
    ``ray.train`` context and reports, world size 1). ``max_failures``: how many times a failed worker
    group is restarted (``FailureConfig``); ``fn`` must resume from its own checkpoint.
    Returns the Ray Train ``Result``; raises if training failed.
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers > 0:
        init_ray(max(os.cpu_count() or 1, num_workers * cpus_per_worker))
    use_gpu = torch.cuda.is_available()
    # Ray's worker processes inherit the environment of the cluster's start, not the driver's now: a process
    # that runs several stages (tests, notebooks) may have changed the MLflow store since. The workers take
    # the driver's values at each call.
    driver_env = {k: os.environ[k] for k in _DRIVER_ENV if k in os.environ}
    trainer = TorchTrainer(
        functools.partial(_with_driver_env, fn),
        train_loop_config={**config, "_driver_env": driver_env},
        # In-process Ray: the process group's rendezvous store listens on loopback (torch's own binds every
        # interface). A cluster (RAY_ADDRESS) keeps Ray's, whose workers reach each other across nodes.
        torch_config=None if os.environ.get("RAY_ADDRESS") else loopback_torch_config(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu and num_workers > 0,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()


_DRIVER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MMP_WORKSPACE")


def loopback_torch_config():
    """Ray Train's ``TorchConfig`` whose process group meets on 127.0.0.1.

    Ray's own set-up initialises ``torch.distributed`` with ``env://``, whose TCPStore server binds every
    interface (``::``) even with one worker; anyone who reaches that port can write to the store. Here worker 0
    opens the listening socket on loopback itself and hands it to the TCPStore (``master_listen_fd``); the
    workers, all on this machine, join it there, and gloo's own connections go over loopback too."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            worker_group.execute(_torch_env)
            port = worker_group.execute_single(0, _listen_on_loopback)
            backend = backend_config.backend or "gloo"
            import ray

            ray.get([worker_group.execute_single_async(i, _join_on_loopback, backend=backend, world_rank=i,
                                                       world_size=len(worker_group), port=port,
                                                       timeout_s=backend_config.timeout_s)
                     for i in range(len(worker_group))])

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    return LoopbackTorchConfig()


_listener = None  # worker 0's loopback socket, kept open for the TCPStore that serves on it


def _torch_env() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()  # LOCAL_RANK, RANK, WORLD_SIZE, ... as Ray's set-up sets them
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair connections on loopback


def _listen_on_loopback() -> int:
    import socket

    global _listener
    _listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _listener.bind(("127.0.0.1", 0))
    _listener.listen(128)
    return _listener.getsockname()[1]


def _join_on_loopback(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    master = world_rank == 0
    store = dist.TCPStore("127.0.0.1", port, world_size, master, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=_listener.fileno() if master else None)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def _with_driver_env(fn: Callable[[dict], Any], config: dict) -> Any:
    os.environ.update(config.get("_driver_env", {}))
    return fn(config)


def average_gradients(params) -> None:
    """Data-parallel gradient averaging across the Ray Train process group (gloo on CPU, NCCL on GPU).

    For loops that do not wrap their model in DDP (``rl/scst_trainer.py``: its loss calls sub-modules
    directly); an explicit all-reduce after ``backward`` gives DDP's update. The train recipe uses DDP.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for q in params:
        if q.grad is not None:
            dist.all_reduce(q.grad)
            q.grad /= world
