"""Dataset-scale commands across processes and machines, on ``torch.distributed``.

Launched under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…), a
command joins the process group once (:func:`setup`), each rank takes a contiguous block of the data
(:func:`shard`), folds its block step by step (:func:`fold`, with per-block checkpoints that
``--resume`` picks up), and the parts are combined with collectives: accumulators all-reduced
(:func:`all_reduce_tree`: sums and counts with SUM, maxima with MAX), per-item results gathered to
rank 0 in dataset order (:func:`gather_ordered`). Per-item results too large to hold for a whole block
(explanation maps, drawn figures) go round by round instead (:func:`deal`: steps dealt round-robin,
rank 0 receives each round in order and may checkpoint what it wrote after it). Only rank 0 writes
outputs (:func:`is_writer`).
Started by ``srun`` without torchrun, SLURM's task variables stand in for torchrun's
(:func:`slurm_task_environment`). Without a launcher every function degrades to the single-process
case (world size 1, no collectives).

Faults: a rank whose work raises publishes ``rank R failed: <cause>`` in the launcher's key-value store,
prints that one line and exits with code 2; the other ranks see the flag between steps (or lose
their collective partner) and stop quietly with code 2. A rank that dies without a word (killed, out
of memory) makes the survivors' collectives fail or the launcher terminate them; the first survivor
prints one line naming the ranks that had not finished. Collectives time out after
``CONVLENS_DIST_TIMEOUT`` seconds (default 1800). Outputs are written by rank 0 only after every
collective has succeeded, so a failed job leaves none (checkpoints stay in ``OUT/.convlens-work``).

Test hook: ``CONVLENS_FAULT=raise@R:S`` (or ``kill@R:S``, ``oom@R:S``, ``hang@R:S``) makes rank R raise
(be killed, run out of memory, hang) at its step S of :func:`fold`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import ConvlensError
from .io import save_torch, unrecorded
from .progress import progress as progress_of

WORK_DIR = ".convlens-work"
TIMEOUT_ENV, CHECKPOINT_ENV, FAULT_ENV = "CONVLENS_DIST_TIMEOUT", "CONVLENS_CHECKPOINT_SECONDS", "CONVLENS_FAULT"
T = TypeVar("T")
P = TypeVar("P")


class Terminated(BaseException):
    """SIGTERM arrived (the launcher stops the ranks because one of them ended)."""


class PeerFailed(ConvlensError):
    """Another rank reported a failure; this rank stops without printing."""


class LostContact(ConvlensError):
    """A collective failed or timed out: a peer is gone or stuck."""


# ---------------------------------------------------------------- process group
def slurm_task_environment(env: dict | None = None) -> dict[str, str] | None:
    """The torchrun variables of a task that ``srun`` started directly (no torchrun), from SLURM's own:
    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID. None when
    torchrun's variables are set, outside an ``srun`` step (a batch script has SLURM_PROCID and
    SLURM_NTASKS but no step), or for a step of one task. MASTER_ADDR and MASTER_PORT must be set."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return None
    try:
        rank_, world, local = (int(env.get(k, "0")) for k in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))
    except ValueError:
        raise ConvlensError("SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID must be integers") from None
    if world <= 1:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ConvlensError(f"started by srun as task {rank_} of {world} without torchrun: set {' and '.join(missing)} "
                            "(the first node's address and a free port) for every task")
    return {"RANK": str(rank_), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets RANK and WORLD_SIZE), or as one of
    several tasks of an ``srun`` step (:func:`slurm_task_environment`)."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or slurm_task_environment() is not None


def launch_rank() -> int:
    """This process's rank as its launcher numbered it (before or without joining the process group)."""
    if active():
        return rank()
    return int((slurm_task_environment() or os.environ).get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Only rank 0 writes outputs and shows progress."""
    return rank() == 0


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(value)
    except ValueError:
        raise ConvlensError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ConvlensError(f"{TIMEOUT_ENV} must be positive, got {value}")
    return seconds


def backend() -> str:
    """gloo for CPU tensors; with CUDA, NCCL for CUDA tensors beside gloo (objects and CPU stay on gloo)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def setup() -> bool:
    """Join the process group the launcher describes (once); returns whether running distributed."""
    if active() or not launched():
        return active()
    if not dist.is_available():
        raise ConvlensError("this PyTorch build has no torch.distributed")
    os.environ.update(slurm_task_environment() or {})  # env:// reads RANK and WORLD_SIZE
    chosen = backend()
    if "nccl" in chosen:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_seconds()))
    except (RuntimeError, ValueError) as exc:
        raise ConvlensError(f"cannot join the process group (rank {launch_rank()}): {first_line(exc)}") from None
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.unraisablehook = _keep_termination(sys.unraisablehook)
    return True


def teardown() -> None:
    if active():
        dist.destroy_process_group()


_terminated = False


def _on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise Terminated("terminated by the launcher")


def _keep_termination(default_hook):
    """An unraisable-exception hook: SIGTERM's exception raised where Python cannot propagate it (a weakref
    callback, a ``__del__``) is not printed as a traceback; the flag set by the handler makes the next
    collective raise it instead (``_collective``)."""
    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, Terminated):
            default_hook(unraisable)
    return hook


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a model's parameters live (CPU for a model without parameters)."""
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def collective_device(device: torch.device | str | None) -> torch.device:
    """CUDA tensors reduce over NCCL, everything else over gloo on the CPU."""
    device = torch.device(device or "cpu")
    return device if device.type == "cuda" and "nccl" in str(dist.get_backend()) else torch.device("cpu")


# ---------------------------------------------------------------- sharding
def shard(count: int, of_rank: int | None = None, of_world: int | None = None) -> range:
    """This rank's contiguous block of ``range(count)``: [⌊count·r/W⌋, ⌊count·(r+1)/W⌋).

    The blocks of ranks 0…W−1 cover every index exactly once, in order; sizes differ by at most one.
    """
    r = rank() if of_rank is None else of_rank
    w = world_size() if of_world is None else of_world
    if count < 0 or w <= 0 or not 0 <= r < w:
        raise ValueError(f"bad shard request: count={count}, rank={r}, world={w}")
    return range(count * r // w, count * (r + 1) // w)


# ---------------------------------------------------------------- collectives
def _collective(what: str, fn: Callable[[], T]) -> T:
    if _terminated:  # SIGTERM arrived where its exception could not propagate
        raise Terminated("terminated by the launcher")
    try:
        return fn()
    except Terminated:
        raise
    except RuntimeError as exc:  # gloo/NCCL: peer closed the connection, or the timeout passed
        raise LostContact(f"{what}: {first_line(exc)}") from None


def all_reduce_tree(tree: Any, device: torch.device | str | None = None, maximum: tuple[str, ...] = ("max",)) -> Any:
    """All-reduce every tensor in a nested dict in place: SUM, or MAX for keys named in ``maximum``.

    Exact for integer counts and for maxima; float sums differ from one process by the order of addition.
    """
    if not active():
        return tree
    target = collective_device(device)

    def visit(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, k)
        elif isinstance(node, torch.Tensor):
            buf = node.to(target)
            op = dist.ReduceOp.MAX if key in maximum else dist.ReduceOp.SUM
            _collective(f"all-reduce of {key}", lambda: dist.all_reduce(buf, op))
            if buf is not node:
                node.copy_(buf)

    visit(tree, "")
    return tree


def all_reduce_int(value: int, op: str = "sum") -> int:
    t = torch.tensor([value], dtype=torch.long)
    all_reduce_tree({op if op == "max" else "sum": t})
    return int(t)


def gather_ordered(first: int, items: list[T]) -> list[T] | None:
    """Rank 0 receives every rank's ``items`` concatenated in dataset order (by ``first``, the block's
    start); other ranks receive None. Objects travel pickled over gloo."""
    if not active():
        return list(items)
    parts = [None] * world_size() if is_writer() else None
    _collective("gather of results", lambda: dist.gather_object((first, items), parts, dst=0))
    if not is_writer():
        return None
    return [item for _, part in sorted(parts, key=lambda p: p[0]) for item in part]


def broadcast_object(obj: T | None, what: str = "rank 0's results") -> T:
    """Rank 0's ``obj`` on every rank (pickled over gloo; the other ranks pass None). Every rank waits
    here until rank 0 arrives, at most ``CONVLENS_DIST_TIMEOUT`` seconds. One process: ``obj``."""
    if not active():
        return obj
    box = [obj if is_writer() else None]
    _collective(f"waiting for {what}", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


# ---------------------------------------------------------------- store: failure flag, progress, liveness
def _store():
    if not active():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError):
        return None


def _key(name: str) -> str:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"convlens/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}/{name}"


def _store_get(name: str) -> str | None:
    store = _store()
    try:
        if store is None or not store.check([_key(name)]):
            return None
        return store.get(_key(name)).decode("utf-8", "replace")
    except (RuntimeError, ValueError):
        return None


def _store_set(name: str, value: str) -> bool:
    store = _store()
    try:
        if store is not None:
            store.set(_key(name), value)
            return True
    except (RuntimeError, ValueError):
        pass
    return False


def _mark(state: str) -> None:
    _store_set(f"{state}/{rank()}", "1")


def _claim_report() -> bool:
    """The first rank to claim prints the job's one error line (True also when there is no store)."""
    store = _store()
    try:
        return store is None or store.add(_key("reported"), 1) == 1
    except (RuntimeError, ValueError):
        return True


def check_peers() -> None:
    """Stop (quietly) when another rank has reported a failure."""
    if active() and _store_get("failed") is not None:
        raise PeerFailed("another rank failed")


def unfinished_ranks() -> list[int]:
    """Ranks other than this one that joined but never marked their work finished."""
    return [r for r in range(world_size()) if r != rank() and _store_get(f"finished/{r}") is None]


def mark_finished() -> None:
    _mark("finished")


# ---------------------------------------------------------------- failure reporting
def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def cause(exc: BaseException) -> str:
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "out of memory"
    if isinstance(exc, ConvlensError):
        return first_line(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"


def report(exc: BaseException) -> int:
    """The one-line error of a distributed job for ``exc`` raised on this rank; returns the exit code.

    A rank that fails publishes its cause and prints it; ranks stopped because of it stay quiet; when
    a rank vanished without a word, the first survivor names the ranks that had not finished.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # this rank is stopping anyway: let it say why, then exit
    peer = _store_get("failed")
    if isinstance(exc, PeerFailed) or (peer is not None and isinstance(exc, (Terminated, LostContact))):
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return 130
    me = launch_rank()
    if isinstance(exc, (Terminated, LostContact)):
        gone = unfinished_ranks()
        who = f"rank{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))}" if gone else "another rank"
        message = (f"rank {me} stopped: lost contact with {who}, which ended without reporting an error "
                   f"(killed, out of memory, or stuck past the {timeout_seconds():g} s timeout): {first_line(exc)}")
    else:
        message = f"rank {me} failed: {cause(exc)}"
        _store_set("failed", message)
    if _claim_report():
        print(f"convlens: error: {message}", file=sys.stderr, flush=True)
    return 2


def inject_fault(step: int) -> None:
    """The ``CONVLENS_FAULT`` test hook (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, _, where = spec.partition("@")
    fault_rank, _, fault_step = where.partition(":")
    if int(fault_rank) != rank() or int(fault_step or 0) != step:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "oom":
        raise MemoryError("injected out-of-memory")
    if kind == "hang":
        time.sleep(10 ** 6)
    raise RuntimeError(f"injected fault at step {step}")


# ---------------------------------------------------------------- resumable folds
def fingerprint(model: torch.nn.Module | None, **key: Any) -> str:
    """A short hash of what a job's results depend on: its options and the model's parameters."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    if model is not None:
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Job:
    """A job over ``count`` items, taken ``step`` at a time; this rank folds its block of steps.

    Checkpoints go to ``out/.convlens-work/<name>-<key>/block-<first>-<stop>.pt`` (one file per block
    of steps, so a resumed run of the same world size skips what each rank had finished).
    """
    name: str
    count: int
    step: int
    out: Path | None = None
    key: str = ""
    resume: bool = False
    progress: bool = False
    resumed: int = field(default=0, init=False)

    def units(self) -> range:
        return shard(-(-self.count // self.step) if self.count else 0)

    def items(self, unit: int) -> tuple[int, int]:
        return unit * self.step, min(self.count, (unit + 1) * self.step)

    def folder(self) -> Path | None:
        return None if self.out is None else Path(self.out) / WORK_DIR / f"{self.name}-{self.key}"

    def checkpoint(self) -> Path | None:
        units, folder = self.units(), self.folder()
        return None if folder is None else folder / f"block-{units.start}-{units.stop}.pt"

    def cleanup(self) -> None:
        """Remove this job's checkpoints (rank 0, after the outputs are written)."""
        folder = self.folder()
        if folder is None or not is_writer():
            return
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()
        except OSError:
            pass


class Progress:
    """One report for the whole job, on rank 0: every rank adds its items to a counter in the store."""

    def __init__(self, job: Job):
        self.bar = progress_of(desc=job.name, total=job.count, unit="item", enabled=job.progress and is_writer())
        self.key, self.count, self.local, self.shown = _key(f"progress/{job.name}"), job.count, 0, 0

    def advance(self, n: int) -> None:
        self.local += n
        done, store = self.local, _store()
        if store is not None:
            try:
                done = store.add(self.key, n)
            except (RuntimeError, ValueError):
                pass
        done = min(done, self.count)
        if done > self.shown:
            self.bar.update(done - self.shown)
            self.shown = done

    def close(self) -> None:
        self.bar.close()


def checkpoint_seconds() -> float:
    try:
        return float(os.environ.get(CHECKPOINT_ENV, "60"))
    except ValueError:
        raise ConvlensError(f"{CHECKPOINT_ENV} must be a number of seconds") from None


def fold(job: Job, compute: Callable[[int, int], P], combine: Callable[[T, P], T], state: T,
         encode: Callable[[T], Any] = lambda s: s, decode: Callable[[Any], T] = lambda s: s) -> T:
    """``state = combine(state, compute(lo, hi))`` over this rank's steps of items [lo, hi), in order.

    With ``job.resume``, a checkpoint of this rank's block restores the state and the steps already done;
    a checkpoint is written every ``CONVLENS_CHECKPOINT_SECONDS`` (default 60) and, when other ranks may
    still fail after it, at the block's end.
    ``encode``/``decode`` turn the state into tensors, lists and dicts (loaded with ``weights_only=True``).
    """
    units, path = job.units(), job.checkpoint()
    start, resumed = units.start, 0
    if job.resume and path is not None and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is recomputed, not fatal
            print(f"convlens: ignoring damaged checkpoint {path}: {first_line(exc)}", file=sys.stderr)
        else:
            state, start = decode(saved["state"]), int(saved["next"])
            resumed = job.items(start - 1)[1] - job.items(units.start)[0] if start > units.start else 0
    progress = Progress(job)
    progress.advance(resumed)
    every, last = checkpoint_seconds(), time.monotonic()
    try:
        for step, unit in enumerate(range(start, units.stop)):
            check_peers()
            inject_fault(step)
            lo, hi = job.items(unit)
            state = combine(state, compute(lo, hi))
            progress.advance(hi - lo)
            block_done = unit + 1 == units.stop and world_size() > 1
            if path is not None and (block_done or time.monotonic() - last >= every):
                with unrecorded():
                    save_torch(path, {"next": unit + 1, "state": encode(state)})
                last = time.monotonic()
    finally:
        progress.close()
    mark_finished()
    job.resumed = all_reduce_int(resumed)
    announce_resumed(job)
    return state


def announce_resumed(job: Job) -> None:
    """One line (rank 0) saying how many items a resumed job took from checkpoints instead of computing."""
    if job.resumed and is_writer():
        print(f"convlens: resumed {job.resumed:,} of {job.count:,} items of {job.name} from checkpoints",
              file=sys.stderr)


def deal(job: Job, compute: Callable[[int, int], P], emit: Callable[[P], None], first: int = 0,
         after_round: Callable[[int], None] | None = None) -> None:
    """Steps dealt round-robin, results emitted on rank 0 in dataset order with memory flat in ``job.count``.

    Round j: rank r computes step first + j·W + r (items [lo, hi) of :meth:`Job.items`; none past the last
    step), then rank 0 receives the round's W results in step order, calls ``emit`` on each, and every
    rank calls ``after_round`` with the next step not yet done (rank 0 checkpoints there). Steps before
    ``first`` were finished by an interrupted run (``--resume``): they are counted as resumed, not
    computed. Every other step is computed exactly once; rank 0 holds one round of results at a time.
    Same fault hook, peer checks and single progress report as :func:`fold`.
    """
    steps, world = -(-job.count // job.step) if job.count else 0, world_size()
    first = min(first, steps)
    job.resumed = job.items(first - 1)[1] if first else 0
    progress = Progress(job)
    if is_writer():
        progress.advance(job.resumed)
    try:
        for j in range(-(-(steps - first) // world)):
            check_peers()
            inject_fault(j)
            unit = first + j * world + rank()
            part = None
            if unit < steps:
                lo, hi = job.items(unit)
                part = compute(lo, hi)
                progress.advance(hi - lo)
            for result in gather_ordered(unit, [part]) or []:
                if result is not None:
                    emit(result)
            if after_round is not None:
                after_round(min(steps, first + (j + 1) * world))
    finally:
        progress.close()
    mark_finished()
    announce_resumed(job)
