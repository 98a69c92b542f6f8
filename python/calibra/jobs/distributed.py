"""A job across the ranks of ``torch.distributed`` (``torchrun --nproc-per-node N -m calibra ...``, or the
Python API inside an initialized process group): data parallelism over the calibration samples.

- The process group: the one already initialized, else one started from torchrun's environment
  (``WORLD_SIZE`` > 1): NCCL when CUDA is there (each rank on its ``LOCAL_RANK``'s GPU), gloo on the CPU,
  with a timeout (``CALIBRA_DIST_TIMEOUT`` seconds, default 1800) so that a rank that died does not leave
  the others waiting for ever.
- The samples: rank r takes samples r, r + N, r + 2N, ... (a fixed split that keeps every rank's share of
  long and short samples alike); every rank needs at least one.
- The statistics: every pass over a layer ends with ``calib.distributed.all_reduce_statistics``
  (``LayerRunner(combine=...)``), summed in float64, so each rank's solver reads the statistics of the
  whole calibration set.
- The solves: a group's solves are assigned to ranks by cost (:meth:`World.owners`) and each result is
  broadcast from its owner (:meth:`World.share`, through ``LayerQuantizer.parallel`` /
  ``LayerPruner.parallel``); every rank then propagates its own samples through the compressed layer.
- One writer: rank 0 writes the output, the checkpoints and the report and runs the evaluation; the
  other ranks write nothing.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

TIMEOUT_ENV = "CALIBRA_DIST_TIMEOUT"


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` ranks over ``backend`` (None: one process)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """The rank that writes files and evaluates."""
        return self.rank == 0

    def to_dict(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}

    def fingerprint(self) -> dict:
        """What a checkpointed run records of its world (a resume needs the same number of ranks)."""
        return {"world_size": self.size}

    def plan_args(self, calibration) -> dict:
        """``plan_job``'s arguments for one rank of this world: its share of the calibration samples, the
        world size, and how many ranks share this host's memory (torchrun's ``LOCAL_WORLD_SIZE``)."""
        import dataclasses

        args = {"ranks": self.size, "ranks_on_host": int(os.environ.get("LOCAL_WORLD_SIZE", self.size) or self.size)}
        if calibration is not None:
            n = -(-int(calibration.num_samples) // self.size)
            bs = calibration.batch_size
            args["calibration"] = dataclasses.replace(
                calibration, num_samples=n, batch_size=None if bs is None else min(int(bs), n)
            )
        return args

    def checkpoints(self, opener, component: str):
        """The job's layer checkpoints: ``opener()`` in one process; on several ranks the
        :class:`SharedCheckpoints` around rank 0's."""
        if not self.distributed:
            return opener()
        return SharedCheckpoints.open(self, opener, component)

    def shard(self, ids: torch.Tensor, mask: torch.Tensor, component: str):
        """This rank's calibration samples: ``(input_ids, attention_mask, global sample indices)``."""
        n = int(ids.shape[0])
        if n < self.size:
            raise ValueError(
                f"[{component}] {n} calibration sample(s) cannot be split over {self.size} ranks: give at least "
                f"{self.size} (--samples) or run fewer ranks"
            )
        rows = list(range(self.rank, n, self.size))
        return ids[rows], mask[rows], rows

    def combine(self):
        """The ``LayerRunner(combine=...)`` callback of this world (None in one process)."""
        if not self.distributed:
            return None
        from calibra.calib.distributed import all_reduce_statistics

        return all_reduce_statistics

    def owners(self, costs: list[float]) -> list[int]:
        """Each job's rank: the costliest first, each to the least-loaded rank (ties: the lower rank), the
        same on every rank (the same costs in the same order)."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            r = min(range(self.size), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += costs[j]
        return owner

    def solves(self, solved_by: dict) -> list[int]:
        """How many solves each rank did (``LayerQuantizer.solved_by``), for the report."""
        return [sum(1 for r in solved_by.values() if r == rank) for rank in range(self.size)]

    def share(self, obj, owner: int):
        """``obj`` of rank ``owner``, on every rank (the others pass None)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=owner)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order, on rank 0 (None on the others); ``[obj]`` in one process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size if self.writer else None
        dist.gather_object(obj, out, dst=0)
        return out

    def everyone(self, obj) -> list:
        """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in one process)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def total(self, value: int) -> int:
        """``value`` summed over the ranks (token counts for the report)."""
        if not self.distributed:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())


def current_world(component: str = "calibrate") -> World:
    """The job's world: the initialized process group, else torchrun's environment, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    if not dist.is_available():
        raise RuntimeError(f"[{component}] WORLD_SIZE={size} but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size(), backend)


def refuse(world: World, component: str, unsupported) -> None:
    """What a distributed job cannot do yet, refused on every rank before any weight is read."""
    if not world.distributed:
        return
    why = next((msg for asked, msg in unsupported if asked), None)
    if why:
        raise ValueError(f"[{component}] this job runs on {world.size} ranks (torch.distributed); {why}")


def rank_label() -> str:
    """`` (rank R of N)`` inside a process group (for messages), else empty."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f" (rank {dist.get_rank()} of {dist.get_world_size()})"
    return ""


def shutdown() -> None:
    """Leave the process group at the end of a command (a rank that raised leaves without waiting; torchrun
    then stops the others)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank died or timed out (the job can be
    resumed), not an error of this rank's own work."""
    import torch.distributed as dist

    if dist.is_available() and isinstance(e, dist.DistError):
        return True
    # gloo reports a dead peer or a timeout as a plain RuntimeError raised from its transport's sources
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("/gloo/", "NCCL"))


def on_writer(world: World, work, component: str):
    """``work()`` on rank 0, its result returned there; on every other rank None. A failure on rank 0 is
    raised on every rank (the others with its message), so no rank is left waiting in a collective."""
    failure, value = None, None
    if world.writer:
        try:
            value = work()
        except Exception as e:  # the writer re-raises its own below; the others get its message
            failure = e
    message = world.share(None if failure is None else f"{type(failure).__name__}: {failure}", 0)
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"[{component}] rank 0 failed: {message}")
    return value


class SharedCheckpoints:
    """The layer checkpoints (``calibra.io.checkpoint.LayerCheckpoints``) of a job on several ranks.

    Rank 0 holds the files (``local``); the other ranks hold None. Every rank calls the same methods at
    the same points of the job (each method is a collective), and:

    - what rank 0 finds (the finished layers, a refused resume) reaches every rank, a refusal raising on
      every rank;
    - each rank's next-layer inputs (the inputs of its own samples) are gathered into rank 0's checkpoint,
      in rank order, and on ``--resume`` each rank gets its own back; so a resume needs the same world size,
      which is part of the run's fingerprint (a different one is refused, naming both sizes);
    - a finished layer read back on resume (its results, extras and RNG state) is rank 0's, on every rank.
    """

    def __init__(self, world: World, local, component: str):
        self.world, self.local, self.component = world, local, component
        self.folder = None if local is None else local.folder
        self.resumed_from = world.share(None if local is None else local.resumed_from, 0)

    @classmethod
    def open(cls, world: World, opener, component: str) -> SharedCheckpoints:
        """``opener()`` (the verb's ``open_checkpoints``) on rank 0; every rank gets the shared view."""
        return cls(world, on_writer(world, opener, component), component)

    def check_data(self, data_fingerprint) -> None:
        on_writer(self.world, lambda: self.local.check_data(data_fingerprint), self.component)

    def save_layer(self, i: int, layers: dict, dense: list, *, hidden: list | None = None, extra=None) -> None:
        import torch.distributed as dist

        extra = dict(extra or {})
        if hidden is not None:
            parts = [None] * self.world.size if self.world.writer else None
            dist.gather_object([h.cpu() for h in hidden], parts, dst=0)
            if self.world.writer:
                hidden = [h for part in parts for h in part]
                extra["hidden_per_rank"] = [len(part) for part in parts]
        on_writer(
            self.world, lambda: self.local.save_layer(i, layers, dense, hidden=hidden, extra=extra), self.component
        )

    def load_layer(self, i: int):
        loaded = on_writer(self.world, lambda: (self.local.load_layer(i), torch.get_rng_state()), self.component)
        (layers, dense, extra), rng = self.world.share(loaded, 0)
        torch.set_rng_state(rng)
        return layers, dense, extra

    def load_hidden(self, i: int) -> list:
        import torch.distributed as dist

        def read():
            counts = self.local.extra_of(i).get("hidden_per_rank")
            if counts is None or len(counts) != self.world.size:
                raise ValueError(
                    f"[{self.component}] the checkpoints in {self.folder} hold the layer inputs of "
                    f"{1 if counts is None else len(counts)} rank(s), not {self.world.size}: resume with that many "
                    f"ranks, or pass --overwrite to start over"
                )
            flat, parts, at = self.local.load_hidden(i), [], 0
            for n in counts:
                parts.append(flat[at : at + n])
                at += n
            return parts

        parts = on_writer(self.world, read, self.component)
        mine = [None]
        dist.scatter_object_list(mine, parts, src=0)
        return mine[0]

    def finish(self) -> None:
        if self.local is not None:
            self.local.finish()

    def release(self) -> None:
        if self.local is not None:
            self.local.release()
