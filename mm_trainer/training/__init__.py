"""The glue to TRL's trainers: the mixin that attaches mm-trainer to a trainer, the configs and the trainers."""
