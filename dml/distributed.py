"""Data-parallel training with PyTorch's own engine: ``torchrun`` starts the processes,
``torch.distributed`` connects them, :class:`~torch.nn.parallel.DistributedDataParallel` averages
the gradients.

How one step of an N-process run equals one step of a 1-process run on the same global batch:

* every rank draws the same global P x K batch (same sampler, same seed) and takes its own
  contiguous share (:class:`RankShare`), so the shares concatenated in rank order are the
  global batch;
* each rank embeds its share; embeddings and labels are all-gathered (:func:`gather`) before
  the loss and before any mixing, so every rank computes the loss of the global batch, with the
  same random draws (the mixing's randomness comes from torch's CPU generator, seeded alike on
  every rank);
* the gather keeps the gradient of the local part: its backward sums the gradients of the
  gathered embeddings over the ranks and returns the local rows. Every rank's loss is the same
  number, so the local rows receive N times their share of d loss / d embedding; DDP's average
  over the N ranks then gives the model exactly the 1-process gradient, and the loss's own
  parameters (proxies), whose gradient every rank computes in full, their gradient unchanged.

What differs from one process, deliberately: augmentation of a rank's share draws from a
generator of that rank (seeded by seed, rank and epoch) rather than the shared stream, so that
two ranks never apply the same random crops; BatchNorm statistics are per process on the CPU
(``SyncBatchNorm`` needs CUDA; on CUDA trainable BatchNorm layers are converted); Metrix at the
input or a feature map mixes inside the network and is refused with more than one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``world`` processes in all, this one ``rank``, the
    ``local_rank``-th of ``local_world`` on its machine (the variables torchrun sets)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(env: dict[str, str] | None = None) -> Context:
    """The context torchrun describes in ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE``; one process when they are absent."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return Context()
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as exc:
        raise ValueError(f"the torchrun variables WORLD_SIZE / RANK / LOCAL_RANK / "
                         f"LOCAL_WORLD_SIZE must be integers: {exc}") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise ValueError(f"inconsistent torchrun variables: WORLD_SIZE={world}, RANK={rank}, "
                         f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}")
    return Context(world, rank, local_rank, local_world)


def setup(ctx: Context, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on the CPU). The timeout is long because
    the other ranks wait while rank 0 evaluates."""
    if ctx.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=4), **kwargs)


def teardown(ctx: Context, finished: bool = False) -> None:
    """Leave the process group. ``finished``: every rank got here by the same, normal path, so
    they first meet at a barrier, so that no rank leaves while another still works: a rank of
    a two-process gloo run once died of SIGABRT at interpreter exit in CI, after leaving before
    the other (``benchmarks/repro_gloo_teardown.py`` counts such deaths with and without the
    barrier). After an error or an interrupt the other ranks may be anywhere, so no barrier
    then."""
    if ctx.active and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def device_for(ctx: Context, requested: torch.device) -> torch.device:
    """Each rank's device: ``cuda:LOCAL_RANK`` when training on CUDA, else the CPU."""
    if ctx.active and requested.type == "cuda":
        if torch.cuda.device_count() < ctx.local_world:
            raise ValueError(f"{ctx.local_world} processes per machine but "
                             f"{torch.cuda.device_count()} CUDA device(s): use "
                             f"--nproc-per-node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return requested


def cores_given() -> int:
    """The CPU cores this process may run on (its affinity, which a container or taskset
    restricts), not the machine's; all of the machine's where the system cannot tell. The one
    count behind the trainer's threads, the loader's workers and the app's job shares."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(ctx: Context) -> int:
    """torch threads per process when ``train.threads`` is not set: the cores given, shared
    by the processes of this machine."""
    return max(1, cores_given() // max(1, ctx.local_world))


class RankShare:
    """This rank's contiguous share of every global batch of ``sampler``. Every rank iterates
    the same global batches; rank r takes rows ``[r * b, (r + 1) * b)`` with ``b = B / world``,
    so the shares in rank order are the global batch (and the gathered loss is the global
    batch's loss)."""

    def __init__(self, sampler, ctx: Context):
        self.sampler, self.ctx = sampler, ctx

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[torch.Tensor]:
        w, r = self.ctx.world, self.ctx.rank
        for batch in self.sampler:
            if len(batch) % w:
                raise ValueError(f"a global batch of {len(batch)} images cannot be shared "
                                 f"equally by {w} processes; choose a batch size (P x K, or "
                                 f"data.batch_size) divisible by {w}")
            b = len(batch) // w
            yield batch[r * b:(r + 1) * b]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (equal shares); backward: the gathered gradient summed over
    the ranks, this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        parts[rank] = x          # the own rows as computed (same values)
        ctx.rows, ctx.rank = x.shape[0], rank
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather(ctx: Context, emb: torch.Tensor, labels: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's embeddings (gradient flowing to the local rows) and labels."""
    if not ctx.active:
        return emb, labels
    parts = [torch.empty_like(labels) for _ in range(ctx.world)]
    dist.all_gather(parts, labels.contiguous())
    return _GatherRows.apply(emb), torch.cat(parts)


class StepModule(nn.Module):
    """The model, the loss and the strategy as one module, so that DDP averages the
    gradients of all of them (the loss's proxies included). ``forward(images, labels)`` is the
    training loss of the global batch."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, strategy: nn.Module,
                 ctx: Context, embed=None):
        super().__init__()
        self.model, self.loss_fn, self.strategy, self.ctx = model, loss_fn, strategy, ctx
        self.embed = embed or model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb, y = gather(self.ctx, self.embed(images), labels)
        return self.strategy(emb, y)


def wrap(step: StepModule, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters of ``step`` (rebuild it when the trainable set
    changes, e.g. after the frozen-backbone epochs: DDP fixes its set when built)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(step, device_ids=ids, broadcast_buffers=False)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Trainable BatchNorm layers compute global batch statistics on CUDA (SyncBatchNorm);
    frozen ones (``bn_freeze``) stay as they are."""
    if device.type != "cuda" or getattr(model, "bn_freeze", False):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def broadcast(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: Context, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()
