"""`TrainingAuditor`: the audit's hooks into `MMSFTTrainer` (init record, save, model card, push guard)."""

from __future__ import annotations

import json
import logging
import shutil
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.checkpoints import is_checkpoint_dir
from .card import add_to_card, card_error_section
from .markdown import render_markdown
from .naming import group_names
from .params import other_trainable
from .plots import GRAD_NORM_PLOT, LOSS_PLOT, write_plots
from .record import InitRecord
from .report import AuditInputs, build_audit
from .serving import strip_untrained
from .status import DEAD_STATUSES

logger = logging.getLogger(__name__)

AUDIT_JSON = "audit.json"
AUDIT_MD = "AUDIT.md"
AUDIT_ERROR = "audit_error.txt"
AUDIT_FILES: tuple[str, ...] = (AUDIT_JSON, AUDIT_MD, LOSS_PLOT, GRAD_NORM_PLOT)
"""Files the audit writes next to the adapter (none starts with `_`: the Trainer's Hub upload skips those)."""


class AuditFailedError(RuntimeError):
    """Raised by `push_to_hub` when the audit's verdict is `fail` and `audit_block_failed_push` is on."""


def write_audit_files(audit: dict[str, Any], output_dir: Path, plots: bool = True) -> dict[str, Any]:
    """Write the plots, `AUDIT.md` and `audit.json` (last) into `output_dir`; returns the audit as written.

    A plot that cannot be drawn does not stop the rest: its error goes into `audit["files"]["plots_error"]`.
    Plot files of an earlier save that this one does not redraw are removed.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"plots": []}
    if plots:
        try:
            files["plots"] = write_plots(audit["dynamics"], output_dir)
        except Exception as err:  # matplotlib missing or broken: the audit is still worth having
            logger.warning("mm-trainer audit: plots not drawn (%s: %s)", type(err).__name__, err)
            files["plots_error"] = f"{type(err).__name__}: {err}"
    for stale in {LOSS_PLOT, GRAD_NORM_PLOT} - set(files["plots"]):
        (output_dir / stale).unlink(missing_ok=True)
    audit = {**audit, "files": files}
    atomic_write_text(output_dir / AUDIT_MD, render_markdown(audit))
    atomic_write_json(output_dir / AUDIT_JSON, audit)
    return audit


class TrainingAuditor:
    """Audits a run: fingerprints the adapters when built, writes the audit at every save.

    Build it once PEFT has initialised the adapters and before the first optimizer step.

    Args:
        adapters: The run's LoRA adapters.
        model: The PEFT-wrapped model (its other trainable parameters are fingerprinted too).
        args: The training arguments: `output_dir`, `audit_plots`, `audit_block_failed_push`, `serving_clean_save`.
        inputs: Returns what the audit reads as the run stands ([`~mm_trainer.audit.report.AuditInputs`]); called
            at every build, so it must be cheap (references, no copies).
        save: Saves the adapter and its audit to a folder (the trainer's `save_model` without a Hub push), for
            [`guard_push`] to keep a refused run.

    Attributes:
        record: The [`~mm_trainer.audit.record.InitRecord`].
        last_audit: The audit written by the last successful save (`None` before).
        unknown_reason: Set when the run's engine does not let the audit be exact (e.g. FSDP1): the verdict is then
            `"unknown"` with this reason first, which never blocks a push.
    """

    def __init__(
        self,
        adapters: list[Any],
        model: Any,
        args: Any,
        inputs: Callable[[], AuditInputs],
        save: Callable[[str], None],
    ) -> None:
        self.args = args
        self.inputs = inputs
        self.save = save
        self.record = InitRecord(adapters, other_trainable(model, adapters))
        self.last_audit: dict[str, Any] | None = None
        self.unknown_reason: str | None = None
        self._cache: tuple[tuple, dict[str, Any]] | None = None
        self._saved: dict[str, tuple] = {}

    # ---------------------------------------------------------------------------------------------------------------
    def _state_key(self) -> tuple:
        """What the audit depends on, cheaply: weights change only with optimizer steps."""
        inputs = self.inputs()
        return (
            inputs.global_step,
            len(inputs.log_history),
            len(inputs.telemetry_history),
            len(inputs.fired),
            self.record.lost,
            self.record.restored,
        )

    def prepare_save(self) -> None:
        """Build the audit of the run as it stands; call it on every process at the same points (before a save's
        [`on_save`] and before the end-of-training summary), as building may gather sharded weights. Never
        raises: an audit that cannot be built is reported by [`on_save`], which builds it again."""
        try:
            self.report()
        except Exception:
            logger.debug("mm-trainer audit: build failed before the save; on_save reports it", exc_info=True)

    def report(self) -> dict[str, Any]:
        """The audit of the run as it stands (rebuilt only when a step, a log or a fired adapter was added)."""
        key = self._state_key()
        if self._cache is None or self._cache[0] != key:
            audit = build_audit(self.inputs(), self.record)
            if self.unknown_reason is not None:
                reason = {"level": "unknown", "code": "engine", "message": self.unknown_reason}
                audit = {**audit, "verdict": "unknown", "reasons": [reason, *audit["reasons"]]}
            self._cache = (key, audit)
        return self._cache[1]

    # ---------------------------------------------------------------------------------------------------------------
    def on_save(self, output_dir: Path) -> dict[str, Any] | None:
        """Write the audit next to the adapter just saved in `output_dir`. Never raises.

        With `serving_clean_save` (and not in a `checkpoint-*` folder, which must stay resumable), the untrained
        adapters are stripped from the saved adapter first. If anything fails, the adapter stays as saved, stale
        audit files are removed, the traceback goes to `audit_error.txt` and a warning is issued.
        """
        args = self.args
        try:
            audit = dict(self.report())
            if getattr(args, "serving_clean_save", False) and not is_checkpoint_dir(output_dir):
                audit["serving_clean"] = strip_untrained(output_dir, audit["modules"])
            audit = write_audit_files(audit, output_dir, plots=getattr(args, "audit_plots", True))
            add_to_card(output_dir / "README.md", audit)
            (output_dir / AUDIT_ERROR).unlink(missing_ok=True)
        except Exception as err:
            self._report_failure(output_dir, err)
            return None
        self.last_audit = audit
        self._saved[str(output_dir.resolve())] = self._state_key()
        return audit

    def _report_failure(self, output_dir: Path, err: Exception) -> None:
        trace = traceback.format_exc()
        logger.error("mm-trainer audit failed at the save to %s; the adapter is saved.", output_dir, exc_info=True)
        written = False
        try:
            for name in AUDIT_FILES:  # no audit of an earlier save may pass for this one's
                (output_dir / name).unlink(missing_ok=True)
            atomic_write_text(
                output_dir / AUDIT_ERROR,
                f"mm-trainer could not build or write the audit for this save (optimizer step "
                f"{self.inputs().global_step}). The adapter files in this folder are complete.\n\n{trace}",
            )
            written = True
            readme = output_dir / "README.md"
            if readme.is_file():
                add_to_card(readme, None, section=card_error_section(AUDIT_ERROR))
        except Exception:  # e.g. a read-only folder: the warning below still tells the user
            logger.error("mm-trainer audit: could not write %s", output_dir / AUDIT_ERROR, exc_info=True)
        where = (
            f"the traceback is in {output_dir / AUDIT_ERROR}"
            if written
            else f"{AUDIT_ERROR} could not be written either (see the logged errors above)"
        )
        warnings.warn(
            f"mm-trainer could not write the audit to {output_dir} ({type(err).__name__}: {err}). The adapter is "
            f"saved; {where}.",
            RuntimeWarning,
            stacklevel=2,
        )

    def on_model_card(self, output_dir: Path, audit: dict[str, Any]) -> None:
        """Put the section of `audit` (the audit of the latest save) into the `README.md` model card in
        `output_dir`, when there is one. Never raises."""
        readme = output_dir / "README.md"
        try:
            add_to_card(readme, audit)
        except Exception:
            logger.warning("mm-trainer audit: could not add the audit to %s", readme, exc_info=True)

    # ---------------------------------------------------------------------------------------------------------------
    def guard_push(self) -> None:
        """Refuse `push_to_hub` before any Hub call when the verdict is `fail` (`audit_block_failed_push`).

        The adapter and its audit are saved to `output_dir` first (unless this step is already saved there), so
        the user keeps the run and the reasons. An audit that cannot be built does not block the push (warned).

        Raises:
            AuditFailedError: When the verdict is `fail` and blocking is on.
        """
        args = self.args
        if not getattr(args, "audit_block_failed_push", True):
            return
        try:
            audit = self.report()
        except Exception:
            logger.warning("mm-trainer audit could not be built; push_to_hub is not blocked.", exc_info=True)
            return
        if audit["verdict"] != "fail":
            return
        output_dir = Path(args.output_dir)
        if self._saved.get(str(output_dir.resolve())) != self._state_key():
            self.save(str(output_dir))
        reasons = "\n".join(f"  - {r['message']}" for r in audit["reasons"] if r["level"] == "fail")
        raise AuditFailedError(
            f'push_to_hub refused: the mm-trainer audit verdict is "fail" (nothing was uploaded).\n{reasons}\n'
            f"The adapter and its audit are saved in {output_dir} (see {AUDIT_MD}). Fix the run, or set "
            "`audit_block_failed_push=False` in MMSFTConfig to push anyway."
        )

    def before_checkpoint_push(self, checkpoint_folder: Path) -> bool:
        """Bring the checkpoint's audit files into `output_dir` for the Trainer's checkpoint push; `False` (skip
        this push, with a warning) when the checkpoint's verdict is `fail` and `audit_block_failed_push` is on."""
        args = self.args
        output_dir = Path(args.output_dir)
        audit = None
        try:
            for name in (*AUDIT_FILES, AUDIT_ERROR):
                src = checkpoint_folder / name
                if src.is_file():
                    shutil.copy(src, output_dir / name)
                else:
                    (output_dir / name).unlink(missing_ok=True)
            if (checkpoint_folder / AUDIT_JSON).is_file():
                audit = json.loads((checkpoint_folder / AUDIT_JSON).read_text(encoding="utf-8"))
        except Exception:
            logger.warning("mm-trainer audit: could not copy the audit of %s", checkpoint_folder, exc_info=True)
        if audit is not None and audit["verdict"] == "fail" and getattr(args, "audit_block_failed_push", True):
            message = (
                f'mm-trainer audit verdict of {checkpoint_folder.name} is "fail": its push to the Hub is skipped '
                f"(training goes on; see {checkpoint_folder / AUDIT_MD})."
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return False
        return True

    # ---------------------------------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        """A few lines for the console: verdict, trained share, reasons, dead adapters grouped."""
        audit = self.report()
        p = audit["params"]
        counts = audit["status_counts"]
        lines = [
            f"mm-trainer audit: {audit['verdict'].upper()} - {counts['trained']} of {len(audit['modules'])} adapters "
            f"trained; effective trainable params {p['effective_trainable']:,} of {p['nominal_trainable']:,} "
            f"({p['effective_share']:.1%})"
        ]
        lines += [f"  {r['level']}: {r['message']}" for r in audit["reasons"]]
        for status in DEAD_STATUSES:
            names = [m["name"] for m in audit["modules"] if m["status"] == status]
            for pattern, count in group_names(names)[:8]:
                lines.append(f"    {status}: {pattern} x{count}")
        return lines

    def print_summary(self) -> None:
        """Print [`summary_lines`] (never raises: it runs at the end of `train`)."""
        try:
            from rich.markup import escape

            from ..model.plan_report import console

            colour = {"pass": "green", "warn": "yellow", "fail": "red", "unknown": "yellow"}[self.report()["verdict"]]
            lines = self.summary_lines()
            out = console()
            out.print(f"[bold {colour}]{escape(lines[0])}[/]")
            for line in lines[1:]:
                out.print(escape(line))
        except Exception:
            logger.warning("mm-trainer audit: no summary", exc_info=True)

    # ---------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The init record, for checkpoints (a resumed run must compare with the original init)."""
        return self.record.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the init record from a checkpoint; `None` marks it lost (then movement is not checked)."""
        self.record.load_state_dict(state)
        self._cache = None
