"""One-process checks of what the sharded engines rely on: gradients captured by hooks, names instead of objects.

The two-process runs under FSDP2 / ZeRO-2 / ZeRO-3 are in ``tests/test_sharded.py``.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from mm_trainer.audit.params import other_trainable
from mm_trainer.audit.record import InitRecord
from mm_trainer.core.telemetry import TowerTelemetry
from mm_trainer.model.adapters import lora_adapters
from tests.kit import tiny_model


def _peft_model(seed: int = 0) -> torch.nn.Module:
    model = get_peft_model(
        tiny_model("causal_lm", seed=seed),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    )
    return model.train()


def _backward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()


def test_captured_gradients_equal_accumulated_grads():
    """Capture mode (DeepSpeed) sums each micro-batch's gradient as autograd delivers it: over two micro-batches it
    must give the norms and non-zero flags that ``p.grad`` (DDP, one process) gives, to fp32 summation order."""
    model = _peft_model()
    adapters = lora_adapters(model)
    by_grad, captured = TowerTelemetry(adapters), TowerTelemetry(adapters)
    captured.bind(adapters, capture_gradients=True)
    batches = [torch.tensor([[1, 5, 9, 2, 7]]), torch.tensor([[3, 4, 8, 6, 1]])]
    for ids in batches:
        _backward(model, ids)
    by_grad.collect()
    captured.collect()
    assert not any(captured.nonzero_steps.values())  # counted when the flags are synchronised (log or save)
    a, b = by_grad.flush(1), captured.flush(1)
    assert by_grad.nonzero_steps == captured.nonzero_steps and all(v == 1 for v in captured.nonzero_steps.values())
    assert a.keys() == b.keys()
    for key in a:  # the same two fp32 terms summed in the same order; the norms agree to fp32 rounding
        assert abs(b[key] - a[key]) <= 1e-6 * abs(a[key]), key
    assert a["grad_norm/other"] > 0
    # The buffer was zeroed: a step without a backward has no gradient.
    model.zero_grad()
    captured.collect()
    after = captured.flush(2)
    assert after.keys() == a.keys() and set(after.values()) == {0.0}
    captured.bind(adapters)  # back to reading p.grad: the hooks are gone
    _backward(model, batches[0])
    assert float(captured._captured_flat[:-1].abs().sum()) == 0.0  # the last element is the "step kept" flag


def test_captured_norms_are_reduced_once_per_log_and_only_for_the_logged_step():
    """Capture mode runs no collective per step: at `flush`, one all-reduce carries what fired, one flag per adapter
    and step of the window and the last step's gradients; the window's norms are those of its last step (as with
    `p.grad`), an adapter not reached in the last step counts zero there, `synchronize` (at a save) counts the steps
    without the gradients, and a backward between `collect` and `flush` leaves the window without norms rather than
    with a mixed gradient."""
    model = _peft_model()
    adapters = lora_adapters(model)
    calls: list[int] = []

    def two_identical_ranks(t: torch.Tensor) -> torch.Tensor:  # all-reduce(sum) of two ranks holding the same values
        calls.append(t.numel())
        return t * 2

    by_grad, captured = TowerTelemetry(adapters), TowerTelemetry(adapters)
    captured.bind(adapters, reduce_sum=two_identical_ranks, capture_gradients=True, world_size=2)
    step1, step2 = torch.tensor([[1, 5, 9, 2, 7]]), torch.tensor([[3, 4, 8, 6, 1]])
    for ids in (step1, step2):
        model.zero_grad()
        _backward(model, ids)
        by_grad.collect()
        captured.collect()
    assert calls == []  # nothing per step
    a, b = by_grad.flush(2), captured.flush(2)
    n = len(adapters)  # one all-reduce at the log: fired, 2 steps' flags, the gradient buffer
    assert calls == [n + 2 * n + captured._captured_flat.numel()]
    assert a.keys() == b.keys() and by_grad.nonzero_steps == captured.nonzero_steps
    for key in a:  # the last step's norm (not the sum over the window's steps)
        assert abs(b[key] - a[key]) <= 1e-6 * abs(a[key]), key
    # An adapter whose weights get no gradient in the next step: its stale view must not count.
    frozen = adapters[0]
    for p in (frozen.lora_A, frozen.lora_B):
        p.requires_grad_(False)
    model.zero_grad()
    _backward(model, step1)
    by_grad.collect()
    captured.collect()
    captured.synchronize()  # a save: the step is counted, the gradient stays for the log
    assert calls[-1] == 2 * n
    assert captured.nonzero_steps == by_grad.nonzero_steps and captured.nonzero_steps[frozen.name] == 2
    a, b = by_grad.flush(3), captured.flush(3)
    assert calls[-1] == n + captured._captured_flat.numel()
    for key in a:
        assert abs(b[key] - a[key]) <= 1e-6 * abs(a[key]), key
    for p in (frozen.lora_A, frozen.lora_B):
        p.requires_grad_(True)
    # A backward after collect overwrites the kept step: no norm for that window, the shares stay.
    _backward(model, step2)
    captured.collect()
    _backward(model, step1)
    late = captured.flush(4)
    assert late and not any(k.startswith("grad_norm/") for k in late)


def test_audit_tells_lora_weights_by_name_after_parameters_are_replaced():
    """FSDP2 replaces every parameter object at `prepare`: the init record and `other_trainable` must still match by
    name, count each LoRA weight once and see the LoRA weights as unmoved when only their objects changed."""
    model = _peft_model()
    adapters = lora_adapters(model)
    others = other_trainable(model, adapters)
    assert others and all("lora_" not in name for name in others)  # lm_head's copy (modules_to_save) only
    record = InitRecord(adapters, others)
    # Replace every trainable parameter by a new object holding the same values, as fully_shard does.
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad:
                setattr(module, name, torch.nn.Parameter(param.detach().clone()))
    rebound = lora_adapters(model)
    assert [a.name for a in rebound] == [a.name for a in adapters]
    assert all(a.lora_A is not b.lora_A for a, b in zip(rebound, adapters))
    assert other_trainable(model, rebound).keys() == others.keys()
    movement = record.compare(rebound)
    assert movement.keys() == {a.name for a in adapters} and not any(m.moved for m in movement.values())
    # Move one B: exactly that adapter moved.
    with torch.no_grad():
        rebound[0].lora_B.add_(1e-3)
    moved = {name for name, m in record.compare(rebound).items() if m.moved}
    assert moved == {rebound[0].name}
    assert rebound[0].param_names == (
        f"{rebound[0].name}.lora_A.default.weight",
        f"{rebound[0].name}.lora_B.default.weight",
    )


def test_unknown_verdict_is_written_and_never_blocks_a_push(tmp_path):
    """An engine the audit cannot read exactly (FSDP1) gives verdict "unknown" with the reason first, in audit.json
    and AUDIT.md, and `guard_push` lets the push through."""
    import json

    from mm_trainer import MMSFTConfig, MMSFTTrainer
    from tests.kit import make_tokenizer, text_dataset, training_args

    trainer = MMSFTTrainer(
        model=tiny_model("causal_lm"),
        args=training_args(tmp_path, MMSFTConfig, max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer("causal_lm"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    )
    trainer.train()
    trainer.auditor.unknown_reason = "FSDP1 test reason"
    trainer.auditor._cache = None
    trainer.save_model()
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["verdict"] == "unknown" and audit["reasons"][0]["message"] == "FSDP1 test reason"
    assert "UNKNOWN" in (tmp_path / "AUDIT.md").read_text()
    trainer.auditor.guard_push()  # no AuditFailedError
