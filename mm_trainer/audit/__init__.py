"""The audit of a LoRA run: which adapters actually trained, effective vs nominal parameters, training dynamics.

At every save `MMSFTTrainer` writes `audit.json`, `AUDIT.md` and plots next to the adapter
([`TrainingAuditor`]); `mm-trainer audit PATH` audits any saved PEFT LoRA adapter from its files alone
([`audit_adapter_dir`]).
"""

from __future__ import annotations

from .auditor import AUDIT_ERROR, AUDIT_FILES, AUDIT_JSON, AUDIT_MD, AuditFailedError, TrainingAuditor
from .offline import AdapterDirError, audit_adapter_dir
from .record import Fingerprint, InitRecord, fingerprint
from .report import build_audit
from .status import DEAD_STATUSES, STATUSES, ModuleAudit, classify
from .verdict import FAIL_DEAD_SHARE

__all__ = [
    "AUDIT_ERROR",
    "AUDIT_FILES",
    "AUDIT_JSON",
    "AUDIT_MD",
    "DEAD_STATUSES",
    "FAIL_DEAD_SHARE",
    "STATUSES",
    "AdapterDirError",
    "AuditFailedError",
    "Fingerprint",
    "InitRecord",
    "ModuleAudit",
    "TrainingAuditor",
    "audit_adapter_dir",
    "build_audit",
    "classify",
    "fingerprint",
]
