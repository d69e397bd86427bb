"""Target resolution: turn the user's `LoraConfig` into one that names exactly the modules the data reaches."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .matching import ALL_LINEAR, expert_groups, matched_modules, matched_parameters, with_default_targets
from .modality import ModalityProfile
from .probe import ProbeResult
from .towers import TOWERS, TowerMap, map_towers

logger = logging.getLogger(__name__)

DEAD_TARGET_POLICIES: tuple[str, ...] = ("drop", "warn", "error")


@dataclass
class TargetDecision:
    """What happened to one module the user's `target_modules` matched.

    Attributes:
        name: Module path in the base model.
        tower: Its tower.
        kept: Whether the resolved config adapts it.
        reason: Why it was kept or dropped, in words.
        lora_params: Parameters a LoRA adapter on it costs at the config's rank.
        dead: Whether the data does not reach it (kept anyway under `dead_targets="warn"` or forced towers).
    """

    name: str
    tower: str
    kept: bool
    reason: str
    lora_params: int
    dead: bool = False


@dataclass
class TargetPlan:
    """The resolved targets, with the per-tower account of what was kept, what was dropped and why.

    Attributes:
        peft_config: A copy of the user's config whose `target_modules` is the exact set of kept module paths
            (`None` when the PEFT method takes no `target_modules`; the user's config is then used unchanged).
        decisions: One entry per module the user's config matched, in model order.
        selected_towers: Towers adapters may go on.
        target_towers: The `target_towers` setting (`"auto"` or the user's list).
        profile: The data's modality profile.
        tower_map: The model's tower map.
        probe: The reachability probe, when it ran.
        rank: LoRA rank used for the budget columns.
        user_target_modules: The `target_modules` the user asked for, as given.
    """

    peft_config: Any
    decisions: list[TargetDecision]
    selected_towers: list[str]
    target_towers: str | list[str]
    profile: ModalityProfile
    tower_map: TowerMap
    probe: ProbeResult | None = None
    rank: int = 8
    user_target_modules: Any = None
    warnings: list[str] = field(default_factory=list)

    def kept(self) -> list[str]:
        """Paths of the modules the resolved config adapts."""
        return [d.name for d in self.decisions if d.kept]

    def dropped(self) -> list[str]:
        """Paths the user's config matched that the resolved config leaves out."""
        return [d.name for d in self.decisions if not d.kept]

    def dead_kept(self) -> list[str]:
        """Paths kept although the data does not reach them (`dead_targets="warn"` or forced towers)."""
        return [d.name for d in self.decisions if d.kept and d.dead]

    def wasted_share(self) -> float:
        """Share of the unfiltered LoRA budget (everything the user's config matched) the data never reaches."""
        total = sum(d.lora_params for d in self.decisions)
        dead = sum(d.lora_params for d in self.decisions if d.dead)
        return dead / total if total else 0.0

    def tower_rows(self) -> list[dict[str, Any]]:
        """Per tower: linear layers, base params, matched / kept / dropped counts and LoRA params, and why."""
        rows = []
        for tower in TOWERS:
            linears = [i for i in self.tower_map.linears.values() if i.tower == tower]
            mine = [d for d in self.decisions if d.tower == tower]
            if not linears and not mine:
                continue
            kept = [d for d in mine if d.kept]
            dropped = [d for d in mine if not d.kept]
            reasons = sorted({d.reason for d in dropped}) or sorted({d.reason for d in kept})
            rows.append(
                {
                    "tower": tower,
                    "linear_modules": len(linears),
                    "base_params": self.tower_map.base_params.get(tower, 0),
                    "matched": len(mine),
                    "kept": len(kept),
                    "dropped": len(dropped),
                    "lora_params_kept": sum(d.lora_params for d in kept),
                    "lora_params_dropped": sum(d.lora_params for d in dropped),
                    "reached": tower in self.reached_towers(),
                    "why": "; ".join(reasons),
                }
            )
        return rows

    def reached_towers(self) -> set[str]:
        """Towers the data reaches, from the profile (and the output head, which every token reaches)."""
        return self.profile.reached_towers() | {"output"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plan (used by `mm-trainer plan --json` and the audit)."""
        return {
            "target_towers": self.target_towers,
            "selected_towers": self.selected_towers,
            "user_target_modules": _jsonable_targets(self.user_target_modules),
            "rank": self.rank,
            "profile": self.profile.to_dict(),
            "towers": self.tower_rows(),
            "kept": self.kept(),
            "dropped": [{"name": d.name, "tower": d.tower, "reason": d.reason} for d in self.decisions if not d.kept],
            "dead_kept": self.dead_kept(),
            "wasted_share_unfiltered": self.wasted_share(),
            "lora_params_kept": sum(d.lora_params for d in self.decisions if d.kept),
            "lora_params_unfiltered": sum(d.lora_params for d in self.decisions),
            "probe": self.probe.to_dict() if self.probe is not None else None,
            "tower_map": self.tower_map.to_dict(),
            "warnings": list(self.warnings),
        }


def _jsonable_targets(targets: Any) -> Any:
    if isinstance(targets, (set, frozenset, tuple)):
        return sorted(targets)
    return targets


def validate_target_towers(target_towers: str | Sequence[str]) -> str | list[str]:
    """Check a `target_towers` value: `"auto"` or a non-empty list of names from [`TOWERS`]."""
    if isinstance(target_towers, str):
        if target_towers == "auto":
            return "auto"
        target_towers = [t.strip() for t in target_towers.split(",") if t.strip()]
    towers = list(target_towers)
    if not towers:
        raise ValueError('`target_towers` is empty. Use "auto" or a list such as ["language", "vision"].')
    unknown = [t for t in towers if t not in TOWERS]
    if unknown:
        raise ValueError(
            f'Unknown tower name(s) {unknown} in `target_towers`. Valid names: {list(TOWERS)}, or "auto" to follow '
            "the data."
        )
    return towers


def _parameter_lora_params(model: nn.Module, key: str, rank: int) -> int:
    """LoRA parameters PEFT adds on a targeted parameter: per expert (leading dims) `rank x (in + out)`."""
    param = model.get_parameter(key)
    if param.dim() < 2:
        return 0
    experts = 1
    for size in param.shape[:-2]:
        experts *= int(size)
    return rank * (int(param.shape[-1]) + int(param.shape[-2])) * experts


def _block_reached(block: str, probe: ProbeResult | None) -> bool:
    return probe is not None and any(
        c.startswith(block + ".") and probe.status(c) == "reached" for c in probe.candidates
    )


def _reached_blocks(groups: dict[str, str], probe: ProbeResult | None) -> set[str]:
    """MoE blocks in which the probe saw at least one watched module reached (an expert, a router, a shared MLP)."""
    if probe is None:
        return set()
    return {block for block in set(groups.values()) if _block_reached(block, probe)}


def _user_named(targets: Any, leaf: str | None) -> bool:
    """Whether the user's `target_modules` names `leaf` literally (e.g. asked for `lm_head` on purpose)."""
    if leaf is None:
        return False
    if isinstance(targets, str):
        return targets.lower() != ALL_LINEAR and re.search(rf"(^|[^A-Za-z0-9_]){re.escape(leaf)}", targets) is not None
    return any(t == leaf or t.endswith("." + leaf) for t in targets or ())


def _lora_params(model_modules: dict[str, nn.Module], tower_map: TowerMap, name: str, rank: int) -> int:
    info = tower_map.linears.get(name)
    if info is not None:
        return info.lora_params(rank)
    module = model_modules.get(name)
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() < 2:
        return 0
    return rank * (int(weight.shape[0]) + int(weight.shape[1]))


def resolve_targets(
    model: nn.Module,
    peft_config: Any,
    profile: ModalityProfile,
    *,
    target_towers: str | Sequence[str] = "auto",
    dead_targets: str = "drop",
    probe: ProbeResult | None = None,
    tower_map: TowerMap | None = None,
) -> TargetPlan:
    """Resolve a PEFT config's `target_modules` to the exact modules of the towers the data reaches.

    Args:
        model: The base model (not PEFT-wrapped). Meta-device models work (no weights are read).
        peft_config: The user's PEFT config (`LoraConfig` and other configs with `target_modules`).
        profile: The data's [`~mm_trainer.model.modality.ModalityProfile`].
        target_towers: `"auto"` (follow the data) or an explicit list of towers, which overrides the data.
        dead_targets: What to do with matched modules the data does not reach under `"auto"`: `"drop"` them
            (and log), `"warn"` (keep them and warn) or `"error"` (raise, listing them).
        probe: A reachability probe of a real batch; without it, reachability follows the towers.
        tower_map: A precomputed tower map of `model`.

    Returns:
        The [`TargetPlan`], whose `peft_config` is a copy of `peft_config` with `target_modules` set to
        the kept module paths.

    Raises:
        ValueError: Bad `target_towers` / `dead_targets`, unreached targets under `dead_targets="error"`, or
            a config that resolves to no module at all.
    """
    if dead_targets not in DEAD_TARGET_POLICIES:
        raise ValueError(f"`dead_targets` must be one of {list(DEAD_TARGET_POLICIES)}, got {dead_targets!r}.")
    towers_setting = validate_target_towers(target_towers)
    tower_map = tower_map or map_towers(model)
    rank = int(getattr(peft_config, "r", 8) or 8)

    if not hasattr(peft_config, "target_modules"):
        # Prompt learning and friends: nothing to resolve.
        return TargetPlan(peft_config, [], list(TOWERS), towers_setting, profile, tower_map, probe, rank, None)

    params = matched_parameters(model, peft_config)  # fused 3-D experts and the like (`target_parameters`)
    if peft_config.target_modules is None and getattr(peft_config, "target_parameters", None):
        user_targets = None
        if not params:  # target_parameters that match nothing: PEFT reports it
            return TargetPlan(peft_config, [], list(TOWERS), towers_setting, profile, tower_map, probe, rank, None)
    else:
        user_targets = with_default_targets(model, peft_config).target_modules
    matched = matched_modules(model, peft_config) if user_targets is not None else []
    output_leaf = tower_map.output_name.rsplit(".", 1)[-1] if tower_map.output_name else None
    judge = _Judge(model, tower_map, profile, probe, towers_setting, _user_named(user_targets, output_leaf), rank)
    decisions = [judge.module(name) for name in matched] + [judge.parameter(key) for key in params]
    plan_warnings = _apply_dead_targets(decisions, judge.dead_candidates, dead_targets)
    kept = [d.name for d in decisions if d.kept]
    if not kept:
        raise ValueError(_nothing_left_message(user_targets, matched or params, decisions, tower_map, judge.selected))
    return TargetPlan(
        peft_config=_resolved_config(peft_config, kept, params),
        decisions=decisions,
        selected_towers=judge.selected,
        target_towers=towers_setting,
        profile=profile,
        tower_map=tower_map,
        probe=probe,
        rank=rank,
        user_target_modules=user_targets,
        warnings=plan_warnings,
    )


class _Judge:
    """Decides, target by target, whether the resolved config keeps it and why (see [`resolve_targets`]).

    Dead candidates (targets the data does not reach, on a tower `target_towers="auto"` selected or left out) are
    kept here and collected in `dead_candidates`: `dead_targets` then drops, keeps or refuses them.
    """

    def __init__(
        self,
        model: nn.Module,
        tower_map: TowerMap,
        profile: ModalityProfile,
        probe: ProbeResult | None,
        towers_setting: str | list[str],
        output_asked: bool,
        rank: int,
    ) -> None:
        self.model = model
        self.tower_map = tower_map
        self.probe = probe
        self.towers_setting = towers_setting
        self.output_asked = output_asked
        self.rank = rank
        self.modules = dict(model.named_modules())
        self.reached = profile.reached_towers()
        self.forced = towers_setting != "auto"
        if self.forced:
            self.selected = list(towers_setting)
        else:
            self.selected = [
                t for t in TOWERS if t in self.reached or t == "other" or (t == "output" and output_asked)
            ]
        self.modality_words = "text-only" if profile.text_only else "+".join(sorted(profile.modalities))
        # Per-expert linears are judged with their MoE block: a probe batch of a few rows routes tokens to a few
        # experts only, and an expert it missed trains on other batches.
        self.groups = expert_groups(model)
        self.reached_blocks = _reached_blocks(self.groups, probe)
        self.dead_candidates: list[TargetDecision] = []

    def _candidate(self, decision: TargetDecision) -> TargetDecision:
        self.dead_candidates.append(decision)
        return decision

    def _unselected(self, name: str, tower: str, cost: int) -> TargetDecision:
        """A target outside the selected towers: dropped when `target_towers` excludes its tower, else a dead
        candidate (its tower is not reached by the data)."""
        if self.forced:
            reason = f"tower not in target_towers={list(self.towers_setting)}"
            return TargetDecision(name, tower, False, reason, cost, dead=tower not in self.reached)
        reason = f"{tower} tower not reached by the data ({self.modality_words})"
        return self._candidate(TargetDecision(name, tower, True, reason, cost, dead=True))

    def module(self, name: str) -> TargetDecision:
        """The decision on a module `target_modules` matched."""
        tower = self.tower_map.tower_of(name)
        cost = _lora_params(self.modules, self.tower_map, name, self.rank)
        probe = self.probe
        if tower == "output" and not self.output_asked:
            return TargetDecision(name, tower, False, "output head: adapted only when named", cost)
        if tower not in self.selected:
            return self._unselected(name, tower, cost)
        block = self.groups.get(name)
        if block is not None and block in self.reached_blocks and probe.status(name) != "reached":
            why = f"expert of the MoE block {block}, which the probe reached (experts are judged as a group)"
            return TargetDecision(name, tower, True, why, cost)
        if probe is not None and name in probe.candidates and probe.status(name) != "reached":
            reason = probe.reason(name)
            if self.forced:
                return TargetDecision(name, tower, True, f"forced by target_towers; {reason}", cost, dead=True)
            return self._candidate(TargetDecision(name, tower, True, reason, cost, dead=True))
        if tower not in self.reached and tower != "other" and not (tower == "output" and self.output_asked):
            reason = "forced by target_towers (the data does not reach this tower)"
            return TargetDecision(name, tower, True, reason, cost, dead=True)
        why = "reached: probe saw a non-zero gradient" if probe is not None else "tower reached by the data"
        return TargetDecision(name, tower, True, why, cost)

    def parameter(self, key: str) -> TargetDecision:
        """The decision on a parameter `target_parameters` matched (fused 3-D experts), judged by its MoE block."""
        tower = self.tower_map.tower_of(key)
        cost = _parameter_lora_params(self.model, key, self.rank)
        if tower not in self.selected:
            return self._unselected(key, tower, cost)
        block = key.rsplit(".", 2)[0]  # the block holding the experts module
        probe = self.probe
        watched = probe is not None and any(c.startswith(block + ".") for c in probe.candidates)
        if watched and block not in self.reached_blocks and not _block_reached(block, probe):
            reason = f"probe: no module of its block {block} reached on a batch of the data"
            decision = TargetDecision(key, tower, True, reason, cost, dead=True)
            return decision if self.forced else self._candidate(decision)
        if tower not in self.reached and tower != "other":
            reason = "forced by target_towers (the data does not reach this tower)"
            return TargetDecision(key, tower, True, reason, cost, dead=True)
        return TargetDecision(key, tower, True, "parameter of a tower reached by the data", cost)


def _apply_dead_targets(
    decisions: list[TargetDecision], dead_candidates: list[TargetDecision], dead_targets: str
) -> list[str]:
    """Drop, keep (with a warning) or refuse the dead candidates as `dead_targets` says; warn about forced dead
    targets. Returns the warnings for the plan.

    Raises:
        ValueError: Dead candidates under `dead_targets="error"`.
    """
    plan_warnings: list[str] = []
    if dead_candidates:
        names = [d.name for d in dead_candidates]
        listing = _listing(names)
        if dead_targets == "error":
            raise ValueError(
                f"{len(names)} module(s) matched by `target_modules` are not reached by the data and would never "
                f'train: {listing}. Remove them from `target_modules`, set `dead_targets="drop"` to drop them, or '
                "list their tower in `target_towers` if you really want them."
            )
        if dead_targets == "drop":
            for d in dead_candidates:
                d.kept = False
            logger.info("Dropped %d unreached target module(s): %s", len(names), listing)
        else:
            message = f"Keeping {len(names)} target module(s) the data does not reach (dead_targets='warn'): {listing}"
            plan_warnings.append(message)
            warnings.warn(message, UserWarning, stacklevel=3)
    forced_dead = [d.name for d in decisions if d.kept and d.dead and d not in dead_candidates]
    if forced_dead:
        message = (
            f"target_towers forces {len(forced_dead)} adapter(s) the data does not reach; they will not train: "
            f"{_listing(forced_dead)}"
        )
        plan_warnings.append(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return plan_warnings


def _resolved_config(peft_config: Any, kept: list[str], params: list[str]) -> Any:
    """A copy of `peft_config` naming exactly the kept module paths (and kept parameters)."""
    kept_modules = [n for n in kept if n not in params]
    resolved = copy.deepcopy(peft_config)
    resolved.target_modules = set(kept_modules) if kept_modules or not params else None
    if params:
        resolved.target_parameters = [n for n in kept if n in params]
    # The kept paths already went through the layer filter; PEFT must not apply it again (it does to `.suffix`
    # matches, and it turns 20 or more paths into suffixes).
    for name in ("layers_to_transform", "layers_pattern"):
        if getattr(resolved, name, None) is not None:
            setattr(resolved, name, None)
    return resolved


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _nothing_left_message(user_targets, matched, decisions, tower_map: TowerMap, selected) -> str:
    if not matched:
        examples = [n for n in tower_map.linear_names("language")][:4]
        return (
            f"`target_modules={_jsonable_targets(user_targets)!r}` matches no module of this model. Module paths "
            f"look like {examples}; use their last component (e.g. {sorted({e.rsplit('.', 1)[-1] for e in examples})}"
            '), a full-path regex, or "all-linear".'
        )
    towers = sorted({d.tower for d in decisions})
    return (
        f"`target_modules={_jsonable_targets(user_targets)!r}` only matches modules in tower(s) {towers}, none of "
        f"which the data reaches or `target_towers` selects ({selected}). Target modules of the language model "
        '(e.g. "all-linear" or ["q_proj", "v_proj"]), or set `target_towers` to include those towers.'
    )
