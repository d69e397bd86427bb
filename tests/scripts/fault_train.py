"""Test-only driver: kill a real training process with SIGKILL at a chosen point of a checkpoint save, then resume.

Usage: ``python tests/scripts/fault_train.py WORK_DIR POINT [POINT ...]`` (``OMP_NUM_THREADS=1``).

The libraries are imported once; then, per run, a child process is forked that trains for real:

- ``baseline``: an uninterrupted run of :data:`MAX_STEPS` steps, saved at the end.
- ``<point>``: a run that SIGKILLs itself at ``<point>`` of the save of ``checkpoint-<KILL_STEP>``, then a second child
  that builds a fresh trainer and calls ``train(resume_from_checkpoint=True)`` to the end, saved at the end.

Kill points (each wraps the one writer it names, in the child only; nothing in mm_trainer knows about them):

- ``before_state``: just before ``mm_trainer_state.json`` is written.
- ``mid_state``: halfway through writing ``mm_trainer_state.json`` (half its bytes in the writer's temporary file).
- ``mid_audit``: halfway through writing ``audit.json`` (after ``AUDIT.md`` and the plots).
- ``before_optimizer``: just before the Trainer writes ``optimizer.pt`` (adapter and mm-trainer files are on disk).
- ``mid_optimizer``: halfway through ``optimizer.pt`` (a torch.save cut short).
- ``before_marker``: after ``trainer_state.json`` and the checkpoint rotation, before the completeness marker; run
  with ``save_total_limit=1``, so the rotation has already removed every older checkpoint.

``WORK_DIR/results.json`` gets, per run: the child's exit status / signal, the files of ``checkpoint-<KILL_STEP>``
after the kill, and the log lines of the resume.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import Trainer  # noqa: E402

import mm_trainer.training.sft as trainer_module  # noqa: E402
import mm_trainer.utils.atomic as atomic  # noqa: E402
from mm_trainer import MMSFTTrainer  # noqa: E402
from tests.kit import end_process_group, make_tokenizer, text_dataset, tiny_model, training_args  # noqa: E402

MAX_STEPS = 6
SAVE_STEPS = 2
KILL_STEP = 4
POINTS = ("before_state", "mid_state", "mid_audit", "before_optimizer", "mid_optimizer", "before_marker")


def make_trainer(out: Path, save_total_limit: int | None) -> MMSFTTrainer:
    return MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(
            out,
            max_steps=MAX_STEPS,
            save_strategy="steps",
            save_steps=SAVE_STEPS,
            save_total_limit=save_total_limit,
            learning_rate=5e-3,
            seed=3,
        ),
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _in_target(path: Path) -> bool:
    return Path(path).parent.name == f"checkpoint-{KILL_STEP}"


def _half_written(path: Path, data: bytes) -> None:
    """What a kill halfway through ``atomic_write_bytes`` leaves: half the bytes in its temporary file."""
    fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.write(fd, data[: len(data) // 2])
    os.fsync(fd)
    _die()


def arm(point: str) -> None:
    """Install the kill at ``point`` (in this process only)."""
    if point in ("before_state", "mid_state", "mid_audit"):
        name = "audit.json" if point == "mid_audit" else "mm_trainer_state.json"
        original = atomic.atomic_write_bytes

        def write(path, data, _original=original):
            path = Path(path)
            if path.name == name and _in_target(path):
                if point == "before_state":
                    _die()
                _half_written(path, data)
            return _original(path, data)

        atomic.atomic_write_bytes = write
    elif point in ("before_optimizer", "mid_optimizer"):
        original_save = Trainer._save_optimizer_and_scheduler

        def save_optimizer(self, output_dir, _original=original_save):
            if _in_target(Path(output_dir) / "x"):
                if point == "before_optimizer":
                    _die()
                original_torch_save = torch.save

                def cut_save(obj, f, *args, **kwargs):
                    if str(f).endswith("optimizer.pt"):
                        import io

                        buffer = io.BytesIO()
                        original_torch_save(obj, buffer, *args, **kwargs)
                        data = buffer.getvalue()
                        with open(f, "wb") as out:
                            out.write(data[: len(data) // 2])
                        _die()
                    return original_torch_save(obj, f, *args, **kwargs)

                torch.save = cut_save
            return _original(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_optimizer
    elif point == "before_marker":
        original_mark = trainer_module.MMSFTTrainer.mark_checkpoint_complete

        def mark(self, checkpoint, _original=original_mark):
            if Path(checkpoint).name == f"checkpoint-{KILL_STEP}":
                _die()
            return _original(self, checkpoint)

        trainer_module.MMSFTTrainer.mark_checkpoint_complete = mark
    else:
        raise SystemExit(f"unknown kill point {point!r}; known: {POINTS}")


def in_child(body) -> dict:
    """Run ``body`` in a forked child; its exit code, or the signal that ended it."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:  # noqa: BLE001 - report, then leave without running the parent's cleanup
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
    }


def run_point(work: Path, point: str) -> dict:
    out = work / point
    limit = 1 if point == "before_marker" else None

    def killed_run():
        arm(point)
        make_trainer(out, limit).train()

    result: dict = {"killed": in_child(killed_run)}
    ckpt = out / f"checkpoint-{KILL_STEP}"
    result["files_after_kill"] = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else None
    result["checkpoints_after_kill"] = sorted(p.name for p in out.glob("checkpoint-*"))
    log = out / "resume.log"

    def resumed_run():
        handler = logging.FileHandler(log)
        handler.setLevel(logging.WARNING)
        logging.getLogger("mm_trainer").addHandler(handler)
        trainer = make_trainer(out, limit)
        trainer.train(resume_from_checkpoint=True)
        trainer.save_model()

    result["resumed"] = in_child(resumed_run)
    result["resume_log"] = log.read_text() if log.is_file() else ""
    return result


def main() -> None:
    work = Path(sys.argv[1])
    points = sys.argv[2:] or list(POINTS)
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)

    def baseline():
        trainer = make_trainer(work / "baseline", None)
        trainer.train()
        trainer.save_model()

    results = {"baseline": {"run": in_child(baseline)}}
    for point in points:
        results[point] = run_point(work, point)
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
    end_process_group()
