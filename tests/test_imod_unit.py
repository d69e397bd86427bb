"""IMoD building blocks on a fixed small LoRA layer: masks, constraint gradients, injection, dominance Fisher."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mm_trainer.imod import (
    DominanceTracker,
    IMoDInjector,
    IMoDMasks,
    TokenLayout,
    build_zone,
    layer_position,
    shared_ratio,
)
from mm_trainer.imod.constraints import constraint_gradient, zone_masks
from mm_trainer.imod.inject import ZonedLoraA
from mm_trainer.imod.masks import NON_TEXT_ZONE, SHARED_ZONE, TEXT_ZONE, layer_stacks, zone_counts
from mm_trainer.model.adapters import lora_adapters
from mm_trainer.model.modality import IMAGE, PAD, TEXT
from tests.imod_reference import reference_constraints

D_IN, D_OUT, RANK = 12, 10, 4


class Mixer(nn.Module):
    """A LoRA-able projection followed by a token-mixing read-out (gradients of a position depend on the others)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module(), nn.Module(), nn.Module()])
        self.layers[2].proj = nn.Linear(D_IN, D_OUT)
        self.head = nn.Linear(D_OUT, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers[2].proj(x)
        attn = torch.softmax(y @ y.transpose(1, 2) / D_OUT**0.5, dim=-1)
        return self.head(torch.tanh(attn @ y))


def _peft_mixer(seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(Mixer(), LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    base = model.base_model.model.layers[2].proj.base_layer
    base.weight.requires_grad_(True)  # so the test can see what the base receives
    (adapter,) = lora_adapters(model)
    return model, adapter, base


def _batch(seed: int = 1):
    """Three sequences: text+image with padding, text only, image-heavy; inputs and per-token classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, D_IN, generator=g)
    classes = torch.tensor(
        [
            [TEXT, TEXT, IMAGE, IMAGE, IMAGE, TEXT, PAD],
            [TEXT, TEXT, TEXT, TEXT, TEXT, PAD, PAD],
            [TEXT, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, TEXT],
        ]
    )
    return x, classes


def _task(out: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    valid = (classes != PAD).float()[..., None]
    return ((out - 0.3) ** 2 * valid).sum() / valid.sum()


# ---------------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------------
def test_zone_covers_a_once_with_exact_counts():
    for shape, ratio in (((4, 64), 0.2), ((16, 1024), 0.6), ((3, 7), 0.5), ((8, 8), 0.0), ((8, 8), 1.0)):
        zone = build_zone(shape, ratio, seed=3, name="m")
        assert zone.shape == shape and zone.dtype == torch.uint8
        assert set(zone.unique().tolist()) <= {TEXT_ZONE, NON_TEXT_ZONE, SHARED_ZONE}
        n_t, n_o, n_s = zone_counts(zone.numel(), ratio)
        assert n_t + n_o + n_s == zone.numel() and abs(n_t - n_o) <= 1
        assert (zone == TEXT_ZONE).sum() == n_t and (zone == NON_TEXT_ZONE).sum() == n_o
        assert (zone == SHARED_ZONE).sum() == n_s == round(ratio * zone.numel())
    big = build_zone((16, 1024), 0.3, seed=3, name="m")
    # Interleaved element-wise, not in blocks: every row holds all three zones in about the planned shares.
    for row in big:
        assert 0.2 < (row == SHARED_ZONE).float().mean() < 0.4
    assert torch.equal(big, build_zone((16, 1024), 0.3, seed=3, name="m"))
    assert not torch.equal(big, build_zone((16, 1024), 0.3, seed=4, name="m"))
    assert not torch.equal(big, build_zone((16, 1024), 0.3, seed=3, name="n"))


def test_shared_ratio_grows_with_depth_in_its_own_tower():
    from tests.kit import tiny_model

    model = tiny_model("qwen2_5_vl")
    stacks = layer_stacks(model)
    assert layer_position("model.language_model.layers.1.mlp.down_proj", stacks) == (1, 2)
    assert layer_position("model.visual.blocks.0.attn.qkv", stacks) == (0, 2)
    assert layer_position("model.visual.merger.mlp.0", stacks) == (None, None)  # an MLP's Sequential is no stack
    assert layer_position("lm_head", stacks) == (None, None)
    assert shared_ratio(0.2, 0.4, 0, 28) == pytest.approx(0.2)
    assert shared_ratio(0.2, 0.4, 14, 28) == pytest.approx(0.4)
    assert shared_ratio(0.2, 0.4, 27, 28) == pytest.approx(0.2 + 0.4 * 27 / 28)
    assert shared_ratio(0.2, 0.4, None, None) == pytest.approx(0.2)


def test_masks_are_reproducible_and_fingerprinted():
    model, adapter, _ = _peft_mixer()
    masks = IMoDMasks.build([adapter], model, seed=5, base_ratio=0.2, alpha=0.4)
    (layer,) = masks.layers
    assert (layer.layer, layer.num_layers) == (2, 3)
    assert layer.ratio == pytest.approx(0.2 + 0.4 * 2 / 3)
    again = IMoDMasks.build([adapter], model, seed=5, base_ratio=0.2, alpha=0.4)
    assert masks.fingerprint() == again.fingerprint() and torch.equal(layer.zone, again.layers[0].zone)
    assert IMoDMasks.build([adapter], model, seed=6, base_ratio=0.2, alpha=0.4).fingerprint() != masks.fingerprint()
    record = masks.to_dict()
    assert record["seed"] == 5 and record["layers"][0]["counts"]["shared"] == round(layer.ratio * RANK * D_IN)


# ---------------------------------------------------------------------------------------------------------------------
# Injection on one layer
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lambdas", [(1.0, 1e-4), (0.7, 0.5)])
def test_injected_gradient_matches_independent_autograd(lambdas):
    lambda_msd, lambda_ma = lambdas
    x, classes = _batch()
    layout = TokenLayout.from_classes(classes)

    # The mechanism: armed for the forward and backward of the task loss, which it leaves unchanged.
    model, adapter, base = _peft_mixer()
    masks = IMoDMasks.build([adapter], model, seed=11, base_ratio=0.2, alpha=0.4)
    injector = IMoDInjector([adapter], masks, lambda_msd, lambda_ma)
    injector.arm(layout, scale=1.0)
    task = _task(model(x), classes)
    task.backward()
    injector.disarm()
    assert "forward" not in adapter.module.lora_A["default"].__dict__  # plain F.linear again

    # Reference: the same weights, the constraints written out per sequence, added to the loss, plain autograd.
    ref_model, ref_adapter, _ = _peft_mixer()
    captured = {}
    ref_adapter.module.register_forward_pre_hook(lambda m, args: captured.update(x=args[0].detach()))
    ref_task = _task(ref_model(x), classes)
    assert task.item() == pytest.approx(ref_task.item(), rel=1e-6)  # the loss is the task loss
    msd, ma = reference_constraints(ref_adapter.lora_A, masks.layers[0].zone, captured["x"], classes)
    (ma_only,) = torch.autograd.grad(lambda_ma * ma, ref_adapter.lora_A, retain_graph=True)
    (ref_task + lambda_msd * msd + lambda_ma * ma).backward()
    torch.testing.assert_close(adapter.lora_A.grad, ref_adapter.lora_A.grad, atol=1e-5, rtol=0)

    # B and the base get the task gradient only.
    task_model, task_adapter, task_base = _peft_mixer()
    _task(task_model(x), classes).backward()
    torch.testing.assert_close(adapter.lora_B.grad, task_adapter.lora_B.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(base.weight.grad, task_base.weight.grad, atol=1e-6, rtol=0)
    # ... and each constraint really moved A (so the 1e-5 agreement is not trivial).
    injected = adapter.lora_A.grad - task_adapter.lora_A.grad
    assert injected.abs().max() > 1e-3
    if lambda_ma > 1e-3:
        assert ma_only.abs().max() > 1e-3


def test_closed_form_gradient_matches_the_reference_on_every_kind_of_sequence():
    """Text+image, text only, image only, padding, and a sequence whose shared responses are all zero."""
    g = torch.Generator().manual_seed(3)
    classes = torch.tensor(
        [
            [TEXT, IMAGE, IMAGE, TEXT, TEXT, PAD],
            [TEXT, TEXT, TEXT, PAD, PAD, PAD],
            [IMAGE, IMAGE, IMAGE, IMAGE, PAD, PAD],
            [IMAGE, TEXT, IMAGE, TEXT, IMAGE, TEXT],
        ]
    )
    x = torch.randn(4, 6, D_IN, generator=g)
    x[3] = 0.0  # s_i = 0 for every token: cosines at F.cosine_similarity's eps guard
    zone = build_zone((RANK, D_IN), 0.3, seed=2, name="m")
    a = torch.randn(RANK, D_IN, generator=g).requires_grad_(True)
    lambda_msd, lambda_ma, scale = 0.7, 0.5, 0.25
    msd, ma = reference_constraints(a, zone, x, classes)
    (ref,) = torch.autograd.grad(scale * (lambda_msd * msd + lambda_ma * ma), a)

    layout = TokenLayout.from_classes(classes)
    masks = zone_masks(zone)
    flat = x.reshape(-1, D_IN)
    responses = flat @ (a.detach() * masks).view(3 * RANK, D_IN).T
    step = constraint_gradient(responses, layout, lambda_msd, lambda_ma, scale)
    text = layout.text_rows
    blocks = torch.stack([step.exclusive * text, step.exclusive * (1 - text), step.shared], dim=1)  # tokens x 3 x r
    got = (torch.einsum("nkr,nd->krd", blocks, flat) * masks).sum(0)
    torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    torch.testing.assert_close(step.decoupling, msd.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(step.alignment, ma.detach(), rtol=1e-5, atol=1e-7)
    assert layout.sequences_with_both == 2 and ref.abs().max() > 1e-2


def test_constraint_gradient_of_stacked_layers_equals_each_layer_alone():
    """The injector computes all layers of a micro-batch in one batched call: row l of the result must be layer l's
    own result (no mixing across layers), to fp32 rounding of the batched products."""
    g = torch.Generator().manual_seed(5)
    classes = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, TEXT, PAD], [IMAGE, TEXT, IMAGE, TEXT, IMAGE, TEXT]])
    layout = TokenLayout.from_classes(classes)
    stacked = torch.randn(3, classes.numel(), 3 * RANK, generator=g)
    stacked[1] *= 100.0  # layers of very different scales side by side
    together = constraint_gradient(stacked, layout, 0.7, 0.5, 0.25)
    assert together.decoupling.shape == together.alignment.shape == (3,)
    for layer in range(3):
        alone = constraint_gradient(stacked[layer], layout, 0.7, 0.5, 0.25)
        for field in ("exclusive", "shared", "decoupling", "alignment"):
            a, b = getattr(alone, field), getattr(together, field)[layer]
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()), msg=field)
        assert float(alone.alignment) != 0.0 and float(alone.shared.abs().max()) > 0


def _injected(scale: float, calls) -> tuple[torch.Tensor, float]:
    """(A's gradient with IMoD armed minus A's gradient of the same task alone, the rounding bound of that difference).

    Both gradients hold the task gradient, computed along two code paths (LoRA's ``F.linear`` and IMoD's wider
    product) whose fp32 sums over the tokens round differently: each is off by up to about ``tokens · eps`` times its
    magnitude, and the difference keeps that error even where the injected part is small.
    """
    x, classes = _batch()
    grads = []
    for armed in (True, False):
        model, adapter, _ = _peft_mixer()
        injector = IMoDInjector([adapter], IMoDMasks.build([adapter], model, 11, 0.2, 0.4), 1.0, 0.5)
        if armed:
            injector.arm(TokenLayout.from_classes(classes), scale)
        loss = calls(model, x, classes)
        loss.backward()
        injector.disarm()
        grads.append(adapter.lora_A.grad.clone())
    bound = classes.numel() * torch.finfo(torch.float32).eps * sum(float(g.abs().max()) for g in grads)
    return grads[0] - grads[1], bound


def test_injection_counts_the_first_recorded_call_and_scales():
    def once(model, x, classes):
        return _task(model(x), classes)

    def repeated(model, x, classes):
        first = _task(model(x), classes)
        with torch.no_grad():
            model(x * 2)  # a metrics-only forward: no autograd, not counted
        return first + _task(model(x * 3), classes)  # a second recorded call: its task gradient only

    injected, bound = _injected(1.0, once)
    injected_twice, bound_twice = _injected(1.0, repeated)
    # Counting the second call (or the no-grad one) would add a second injection, of the size of `injected`.
    assert injected.abs().max() > 1e3 * (bound + bound_twice)
    torch.testing.assert_close(injected_twice, injected, atol=bound + bound_twice, rtol=0)
    quarter, bound_quarter = _injected(0.25, once)
    torch.testing.assert_close(quarter, 0.25 * injected, atol=bound_quarter + 0.25 * bound, rtol=0)


def test_an_exception_in_the_forward_or_backward_leaves_lora_a_unpatched():
    x, classes = _batch()
    layout = TokenLayout.from_classes(classes)
    model, adapter, _ = _peft_mixer()
    lora_a = adapter.module.lora_A["default"]
    injector = IMoDInjector([adapter], IMoDMasks.build([adapter], model, 11, 0.2, 0.4), 1.0, 0.5)

    def boom(*args):
        raise RuntimeError("boom")

    head = model.base_model.model.head
    handle = head.register_forward_hook(boom)  # raises after lora_A ran armed
    with pytest.raises(RuntimeError, match="boom"), injector.armed(layout, 1.0):
        assert lora_a.__dict__.get("forward") is not None  # armed: the instance forward is IMoD's
        _task(model(x), classes).backward()
    handle.remove()
    assert "forward" not in lora_a.__dict__ and not injector._armed

    with pytest.raises(RuntimeError, match="boom"), injector.armed(layout, 1.0):
        out = model(x)
        out.register_hook(boom)  # raises in the backward, before A's gradient
        _task(out, classes).backward()
    assert "forward" not in lora_a.__dict__ and not injector._armed and adapter.lora_A.grad is None

    # Still usable afterwards, and as if nothing had happened: the same gradient as a fresh injector leaves.
    with injector.armed(layout, 1.0):
        _task(model(x), classes).backward()
    fresh_model, fresh_adapter, _ = _peft_mixer()
    fresh = IMoDInjector([fresh_adapter], IMoDMasks.build([fresh_adapter], fresh_model, 11, 0.2, 0.4), 1.0, 0.5)
    with fresh.armed(layout, 1.0):
        _task(fresh_model(x), classes).backward()
    assert torch.equal(adapter.lora_A.grad, fresh_adapter.lora_A.grad)
    assert "forward" not in lora_a.__dict__


def test_with_lora_dropout_the_constraints_see_what_a_sees():
    x, classes = _batch()
    layout = TokenLayout.from_classes(classes)
    grads, inputs = [], []
    for armed in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(
            Mixer(), LoraConfig(r=RANK, target_modules=["proj"], lora_dropout=0.3, init_lora_weights=False)
        )
        (adapter,) = lora_adapters(model)
        lora_a = adapter.module.lora_A["default"]
        lora_a.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
        injector = IMoDInjector([adapter], IMoDMasks.build([adapter], model, 11, 0.2, 0.4), 1.0, 0.5)
        if armed:
            injector.arm(layout, 1.0)
        torch.manual_seed(1)  # the same dropout mask in both runs
        model.train()
        _task(model(x), classes).backward()
        injector.disarm()
        grads.append(adapter.lora_A.grad.clone())
    assert torch.equal(inputs[0], inputs[1]) and not torch.equal(inputs[0], x)  # dropout did act
    leaf = adapter.lora_A.detach().clone().requires_grad_(True)
    msd, ma = reference_constraints(leaf, injector.masks.layers[0].zone, inputs[0], classes)
    (ref,) = torch.autograd.grad(msd + 0.5 * ma, leaf)
    torch.testing.assert_close(grads[0] - grads[1], ref, atol=1e-5, rtol=0)


def test_zoned_product_in_bf16_keeps_the_constraint_math_in_fp32():
    x, classes = _batch()
    layout = TokenLayout.from_classes(classes)
    zone = build_zone((RANK, D_IN), 0.3, seed=2, name="m")
    weight = torch.randn(RANK, D_IN).to(torch.bfloat16).requires_grad_(True)
    x16 = x.to(torch.bfloat16)
    seen = {}

    def step(responses):
        seen["dtype"] = responses.dtype
        return constraint_gradient(responses, layout, 1.0, 0.5), layout.text_rows

    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = ZonedLoraA.apply(x16, weight, zone_masks(zone), step)
        plain = torch.nn.functional.linear(x16, weight)
    assert seen["dtype"] == torch.float32 and u.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(u, plain, atol=2e-2, rtol=1e-2)
    (grad,) = torch.autograd.grad(u.float().sum() * 0, weight)  # the constraint part alone
    leaf = weight.detach().float().requires_grad_(True)
    msd, ma = reference_constraints(leaf, zone, x16.float(), classes)
    (ref,) = torch.autograd.grad(msd + 0.5 * ma, leaf)
    torch.testing.assert_close(grad.float(), ref, atol=1e-2 * float(ref.abs().max()), rtol=0)  # bf16 grad storage
    assert grad.dtype == torch.bfloat16


def test_layout_of_padding_free_batch():
    batch = {
        "input_ids": torch.tensor([[1, 9, 9, 2, 3, 9, 4, 5]]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1]]),
    }
    layout = TokenLayout.from_batch(batch, SimpleNamespace(image_token_id=9))
    assert layout.num_sequences == 3
    assert layout.text_count.tolist() == [2.0, 1.0, 2.0] and layout.non_text_count.tolist() == [2.0, 1.0, 0.0]
    assert layout.sequences_with_both == 2
    assert layout.text_index.tolist() == [0, 3, 4, 6, 7] and layout.non_text_sequence.tolist() == [0, 0, 1]


# ---------------------------------------------------------------------------------------------------------------------
# Dominance: per-modality Fisher against per-position parameter copies
# ---------------------------------------------------------------------------------------------------------------------
def test_dominance_fisher_matches_per_position_parameter_copies():
    x, classes = _batch()
    layout = TokenLayout.from_classes(classes)
    model, adapter, _ = _peft_mixer()
    tracker = DominanceTracker([adapter])
    tracker.arm(layout)
    _task(model(x), classes).backward()
    fisher = [f.clone() for f in tracker.fisher_sums()[adapter.name]]
    rate = tracker.finish_step(step=1)

    # Reference: every (sequence, modality) gets its own copy of A and B; the gradient of a copy is exactly the
    # contribution of those positions. The Fisher per modality is the sum over sequences of the squared gradients.
    ref_model, ref_adapter, _ = _peft_mixer()
    proj = ref_model.base_model.model.layers[2].proj
    scaling = proj.scaling["default"]
    a, b = ref_adapter.lora_A.detach(), ref_adapter.lora_B.detach()
    copies = {  # m: 0 text, 1 non-text, 2 padding (belongs to neither)
        (s, m): (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for s in range(3) for m in (0, 1, 2)
    }
    base_out = proj.base_layer(x)
    rows = []
    for s in range(3):
        tokens = []
        for t in range(x.shape[1]):
            m = 0 if classes[s, t] == TEXT else 2 if classes[s, t] == PAD else 1
            ca, cb = copies[(s, m)]
            tokens.append(base_out[s, t] + scaling * (cb @ (ca @ x[s, t])))
        rows.append(torch.stack(tokens))
    y = torch.stack(rows)
    attn = torch.softmax(y @ y.transpose(1, 2) / D_OUT**0.5, dim=-1)
    out = ref_model.base_model.model.head(torch.tanh(attn @ y))
    _task(out, classes).backward()
    ref = [torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(b)]
    for s in range(3):
        for m in (0, 1):
            ca, cb = copies[(s, m)]
            if ca.grad is not None:  # sequence 1 has no image token
                ref[m] += ca.grad**2
                ref[2 + m] += cb.grad**2
    for got, want in zip(fisher, ref):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-4)
    assert ref[1].sum() > 0 and ref[0].sum() > 0
    expected = sum(int((ref[1 + 2 * k] > ref[2 * k]).sum()) for k in (0, 1)) / (a.numel() + b.numel())
    assert rate == pytest.approx(expected)
    assert tracker.history[-1]["step"] == 1 and tracker.latest["per_layer"][adapter.name] == pytest.approx(expected)
