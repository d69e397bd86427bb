"""Two ranks, only rank 0's batch holds an image the plan did not see: both ranks must raise (none waits), with the
check blocking and deferred (all-reduce started by ``check``, read by ``resolve``, as under DeepSpeed ZeRO-0/1/2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from mm_trainer.core.batch_guard import BatchModalityGuard, UnseenModalityError
from mm_trainer.distributed.engine import Engine
from mm_trainer.model.modality import ModalityProfile
from tests.kit import end_process_group, tiny_config

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
engine = Engine(world_size=accelerator.num_processes, device=accelerator.device)
config = tiny_config("qwen2_5_vl")
guard = BatchModalityGuard(ModalityProfile(frozenset({"text"}), rows_sampled=8), config)
text_token = min(set(range(100)) - {config.image_token_id, config.video_token_id})
ids = torch.full((2, 4), text_token)
if accelerator.process_index == 0:
    ids[1, 2] = config.image_token_id
result = {"rank": accelerator.process_index, "raised": None, "deferred_raised": None}
guard.check({"input_ids": torch.full((2, 4), text_token)}, step=1, engine=engine)  # nobody: no error
try:
    guard.check({"input_ids": ids}, step=2, engine=engine)
except UnseenModalityError as err:
    result["raised"] = str(err)
# Deferred: the rank whose batch holds the image raises in `check`; the other one learns it in `resolve`.
guard.check({"input_ids": torch.full((2, 4), text_token)}, step=3, engine=engine, defer=True)
result["pending_after_clean_check"] = guard.pending
guard.resolve()  # nobody: no error
try:
    guard.check({"input_ids": ids}, step=4, engine=engine, defer=True)
    result["pending_after_check"] = guard.pending
    guard.resolve()
except UnseenModalityError as err:
    result["deferred_raised"] = str(err)
result["pending_at_end"] = guard.pending
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
end_process_group()
