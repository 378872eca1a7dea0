"""Checkpoints that survive a cluster: written atomically, checked before a resume, and saved on SIGTERM.

A cluster kills jobs at any instant (SIGKILL on a node failure, SIGTERM then SIGKILL on preemption or at the time
limit). Three rules keep a run resumable:

  * A checkpoint is written into a hidden staging directory, `.partial-checkpoint-N/checkpoint-N`, and renamed to
    `checkpoint-N` only when every process has finished writing it. `transformers.trainer_utils.get_last_checkpoint`
    (and so `--resume`) only ever sees complete checkpoints; a kill mid-save leaves a hidden directory, removed by the
    next save.
  * Before resuming, the checkpoint is read back cheaply (`check_checkpoint`): trainer state JSON, safetensors
    headers, and the zip directories of the torch pickles (optimizer, scheduler, RNG, DeepSpeed shards). A damaged file
    is one clear error instead of a traceback deep inside the load.
  * SIGTERM sets a flag (`PreemptionCallback`); at the next step boundary every rank agrees, the trainer saves a
    checkpoint and stops, and `mtp train` exits 0 so the scheduler can requeue the job with `--resume`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from distill.errors import UserError

STAGING_PREFIX = ".partial-"  # hidden: neither get_last_checkpoint nor the Trainer's rotation glob sees it
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def staging_dir(run_dir: str, step: int) -> str:
    """The directory the Trainer writes checkpoint-`step` into (as its run directory) before the rename."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}")


def remove_partial(run_dir: str) -> None:
    """Delete staging directories a killed save left behind."""
    for path in Path(run_dir).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(staged: str, final: str) -> None:
    """Move a fully written checkpoint to its final name (one rename). A checkpoint of the same step is replaced.
    Its files get the user's umask first (savers create some of them 0600)."""
    from distill.files import share_files

    share_files(staged)
    if os.path.exists(final):  # e.g. a preemption right after resuming saves the same step again
        old = os.path.join(os.path.dirname(final), f"{STAGING_PREFIX}old-{os.path.basename(final)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(os.path.dirname(final))  # the rename itself reaches the disk


def last_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` in output_dir (only complete ones carry that name), or None."""
    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def check_checkpoint(path: str) -> None:
    """UserError naming the damaged file unless `path` reads back as a complete Trainer checkpoint.

    Cheap: JSON parses, safetensors headers (which also check that the file covers every tensor), and the central
    directory at the end of each torch zip file (a truncated file has none). No tensor is loaded.
    """
    from safetensors import SafetensorError, safe_open

    root = Path(path)

    def corrupt(name: str, why: str) -> UserError:
        return UserError(f"checkpoint {root} is corrupt: {name} {why}; resume from an earlier checkpoint-N with "
                         "--resume_from_checkpoint DIR or start a new output_dir")

    state_file = root / "trainer_state.json"
    if not state_file.is_file():
        raise UserError(f"{root} is not a checkpoint directory (no trainer_state.json)")
    try:
        state = json.loads(state_file.read_text())
        int(state["global_step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise corrupt("trainer_state.json", f"cannot be read ({type(exc).__name__})") from None
    if not any((root / name).is_file() for name in WEIGHT_FILES):
        raise corrupt("model weights", f"are missing (none of {', '.join(WEIGHT_FILES)})")
    for file in sorted(root.rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise corrupt(str(file.relative_to(root)), f"cannot be read ({str(exc).splitlines()[0]})") from None
    for pattern in ("*.pt", "*.pth", "*.bin"):
        for file in sorted(root.rglob(pattern)):
            try:
                zipfile.ZipFile(file).close()  # torch.save writes a zip archive; its directory sits at the end
            except (zipfile.BadZipFile, OSError) as exc:
                raise corrupt(str(file.relative_to(root)), f"cannot be read ({exc})") from None
    latest = root / "latest"  # DeepSpeed: names the sub-directory holding the ZeRO shards
    if latest.is_file() and not (root / latest.read_text().strip()).is_dir():
        raise corrupt("latest", f"names {latest.read_text().strip()!r}, which is missing")


class PreemptionCallback(TrainerCallback):
    """SIGTERM -> save a checkpoint at the next step boundary and stop training (the process then exits 0).

    `any_rank(flag) -> bool` reduces the flag over processes: the signal reaches ranks at slightly different times, and
    a save is a collective under DeepSpeed/FSDP, so every rank must stop after the same step. The handler is installed
    only while `listening()` (the trainer wraps `train()` in it), so an aborted run never leaves it behind.
    """

    def __init__(self, any_rank=lambda flag: flag):
        self.any_rank = any_rank
        self.received: int | None = None
        self.stopped_at: int | None = None

    def _handle(self, signum, frame):  # only set a flag: a handler must not do I/O or collectives
        self.received = signum

    @contextmanager
    def listening(self):
        self.received, self.stopped_at = None, None
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.any_rank(self.received is not None):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
