"""The distributed engine a run trains under (single process, DDP, FSDP, DeepSpeed) and what sharding asks of us."""
