"""The model map: which tower each module belongs to, what the data holds and reaches, and the LoRA targets it gives.

- `towers`: module path -> tower (`language`, `vision`, `audio`, `projector`, `output`, `other`).
- `modality`: the modalities of a dataset (a bounded sample) and of each token of a batch.
- `probe`: one training step's forward + backward that tells which modules an adapter would train on.
- `targets`: the user's `LoraConfig` resolved to the exact modules of the reached towers.
- `release`, `loading`: towers the data never reaches, released from memory or never loaded.
- `adapters`: the LoRA adapters of a PEFT-wrapped model.
"""
