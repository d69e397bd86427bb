"""IMoD (Implicit Modality Decomposition) for LoRA, and the Non-Text Dominance Rate.

- [`.masks`]: seeded element-wise text / non-text / shared masks of every LoRA `A`.
- [`.tokens`]: where the text and non-text tokens of a batch sit, per sequence (built once per micro-batch).
- [`.constraints`]: the MSDC and MAAC constraints and their gradient w.r.t. `A` (fp32).
- [`.inject`]: injecting that gradient into the task's backward.
- [`.dominance`]: per-modality Fisher estimates and the Non-Text Dominance Rate.
- [`.balance`]: the wiring into [`~mm_trainer.MMSFTTrainer`].
"""

from __future__ import annotations

from .balance import ModalityBalance, check_imod_data
from .constraints import (
    ConstraintTerms,
    ResponseGradient,
    constraint_gradient,
    constraint_terms,
    imod_constraints,
    response_gradient,
    zone_masks,
)
from .dominance import DominanceTracker
from .inject import IMoDInjector, ZonedLoraA
from .masks import (
    NON_TEXT_ZONE,
    SHARED_ZONE,
    TEXT_ZONE,
    IMoDMasks,
    LayerMask,
    build_zone,
    layer_position,
    shared_ratio,
)
from .tokens import TokenLayout

__all__ = [
    "NON_TEXT_ZONE",
    "SHARED_ZONE",
    "TEXT_ZONE",
    "ConstraintTerms",
    "DominanceTracker",
    "IMoDInjector",
    "IMoDMasks",
    "LayerMask",
    "ModalityBalance",
    "ResponseGradient",
    "TokenLayout",
    "ZonedLoraA",
    "build_zone",
    "check_imod_data",
    "constraint_gradient",
    "constraint_terms",
    "imod_constraints",
    "layer_position",
    "response_gradient",
    "shared_ratio",
    "zone_masks",
]
