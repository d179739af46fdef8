"""Layerwise bit-width × rank plans (QR-Adaptor style): representation, memory, seeds, Pareto front.

A plan gives every decoder layer a bit-width (4: bnb NF4, 8: bnb int8, 16: unquantized) and a LoRA rank
(0: no adapter; alpha = 2·rank). It becomes job-spec fields (``plan_fields``): ``model.quantization_plan``,
``method.rank_pattern`` / ``alpha_pattern`` and a ``method.target_modules`` regex that leaves rank-0
layers out, so ``raypeft train`` trains it unchanged.

Pure: no torch, no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.memory import Layers, Shape, layerwise_estimate


def layer_key(i: int) -> str:
    """The pattern (PEFT ``rank_pattern`` rule) matching every module of decoder layer ``i``."""
    return rf"model\.layers\.{i}\..*"


def to_point(layers: Layers) -> dict[str, int]:
    """A plan as the flat ``bits_i`` / ``rank_i`` parameters the search samples."""
    return {k: v for i, (b, r) in enumerate(layers) for k, v in ((f"bits_{i}", b), (f"rank_{i}", r))}


def from_point(point: dict) -> Layers:
    """The plan in a trial config's ``bits_i`` / ``rank_i`` parameters."""
    n = sum(1 for k in point if k.startswith("bits_"))
    return [(int(point[f"bits_{i}"]), int(point[f"rank_{i}"])) for i in range(n)]


def plan_fields(layers: Layers, targets: Sequence[str]) -> dict[str, object]:
    """Dotted job-spec fields that load and train ``layers``. Raises ValueError if no layer has an adapter."""
    adapted = [i for i, (_, r) in enumerate(layers) if r > 0]
    if not adapted:
        raise ValueError("a plan needs at least one layer with rank > 0")
    ranks = {layer_key(i): r for i, (_, r) in enumerate(layers) if r > 0}
    return {
        "model.quantization_plan": {layer_key(i): b for i, (b, _) in enumerate(layers)},
        "method.r": max(ranks.values()),
        "method.alpha": 2.0 * max(ranks.values()),
        "method.rank_pattern": ranks,
        "method.alpha_pattern": {k: 2.0 * r for k, r in ranks.items()},
        "method.target_modules": rf"model\.layers\.({'|'.join(map(str, adapted))})\..*\.({'|'.join(targets)})",
    }


@dataclass(frozen=True)
class Memory:
    """A plan's bytes (``layerwise_estimate``): weights + adapter + its gradients and AdamW states and, with
    ``tokens`` (micro batch × sequence length) > 0, the training step's activations: the peak. A value, not a
    closure, because Tune pickles the searcher that holds it."""

    shape: Shape
    targets: tuple[str, ...]
    param_bytes: int = 4
    double_quant: bool = True
    tokens: int = 0
    checkpointing: bool = False
    loss_chunk: int = 0

    def __call__(self, layers: Layers) -> float:
        return layerwise_estimate(
            self.shape,
            layers,
            tuple(self.targets),
            param_bytes=self.param_bytes,
            double_quant=self.double_quant,
            tokens=self.tokens,
            checkpointing=self.checkpointing,
            loss_chunk=self.loss_chunk,
        ).total


def memory(
    shape: Shape,
    layers: Layers,
    targets: Sequence[str],
    param_bytes: int = 4,
    double_quant: bool = True,
    tokens: int = 0,
) -> float:
    """Bytes of the plan (``Memory``): weights + adapter + its states, + activations of ``tokens`` if > 0."""
    return Memory(shape, tuple(targets), param_bytes, double_quant, tokens)(layers)


def uniform(shape: Shape, bits: int, rank: int) -> Layers:
    return [(bits, rank)] * shape.layers


def seed_plans(
    sensitivity: dict[int, list[float]],
    importance: list[float],
    bits: Sequence[int],
    ranks: Sequence[int],
    fits: Callable[[Layers], bool],
) -> list[Layers]:
    """Warm starts for the multi-objective search, from the calibration.

    * every uniform plan (one bit-width, one rank) that fits;
    * no adapter on the bottom k layers (k = n/8, n/4, n/3), ranks raised above them by importance:
      no gradient reaches a layer below every adapter, so under a peak budget its activations are
      not kept at all, which frees far more memory than its adapter held (the README measures it);
    * no adapter on the k least important layers, their memory spent on rank where it matters most;
    * rank allocations by importance at the cheapest bit-width: two tiers (the more important half of
      the layers gets the larger rank) and three tiers (top third the largest rank, middle third the
      middle one, bottom third the smallest, 0 included), which keep the adapter's size while moving
      rank to where the gradients are;
    * each of these again with bits raised greedily: the layer whose quantization hurts most (per
      step up) moves up one bit-width, while the plan fits.

    In that order, so a search with fewer trials than seeds tries the first ones.
    """
    n = len(importance)
    bits, nz = sorted(bits), sorted(r for r in ranks if r > 0)
    seeds: list[Layers] = []
    for b in bits:
        for r in nz:
            plan = [(b, r)] * n
            if fits(plan):
                seeds.append(plan)
    if not nz:
        return seeds
    order = sorted(range(n), key=lambda i: -importance[i])
    tier = {i: k * 3 // n for k, i in enumerate(order)}  # 0: most important third

    def two(hi: int, lo: int) -> Layers:
        return [(bits[0], hi if tier[i] == 0 or (tier[i] == 1 and order.index(i) < n // 2) else lo) for i in range(n)]

    def three(hi: int, mid: int, lo: int) -> Layers:
        return [(bits[0], (hi, mid, lo)[tier[i]]) for i in range(n)]

    lo, mid, hi = sorted(ranks)[0], nz[len(nz) // 2], nz[-1]
    starts = []
    if lo == 0:
        for k in sorted({max(1, n // 8), max(1, n // 4), max(1, n // 3)}):  # the bottom k layers
            if k < n:
                starts.append(_upgrade_ranks([(bits[0], 0 if i < k else mid) for i in range(n)], order, nz, fits))
        for k in sorted({1, 2, max(3, n // 8)}):  # the k least important layers
            if k < n:
                starts.append(
                    _upgrade_ranks(
                        [(bits[0], 0 if order.index(i) >= n - k else mid) for i in range(n)], order, nz, fits
                    )
                )
    starts += [two(mid, nz[0]), two(hi, mid), two(hi, nz[0]), three(hi, mid, lo), three(hi, mid, nz[0])]
    for start in [*(s for s in seeds if s[0][0] == bits[0]), *starts]:
        if fits(start):
            seeds += [start, _upgrade_bits(start, bits, sensitivity, fits)]
    unique: list[Layers] = []
    for s in seeds:
        if s not in unique and any(r for _, r in s):
            unique.append(s)
    return unique


def _upgrade_bits(
    plan: Layers, bits: list[int], sensitivity: dict[int, list[float]], fits: Callable[[Layers], bool]
) -> Layers:
    """``plan`` with bits raised greedily: the layer whose quantization hurts most (per step up) moves up one
    bit-width, while the plan fits."""
    plan, n = list(plan), len(plan)
    while True:
        gains = []
        for i, (b, _r) in enumerate(plan):
            if b != bits[-1]:
                nxt = bits[bits.index(b) + 1]
                gain = sensitivity.get(b, [0.0] * n)[i] - sensitivity.get(nxt, [0.0] * n)[i]
                gains.append((gain, i, nxt))
        for _gain, i, nxt in sorted(gains, reverse=True):
            trial = plan[:i] + [(nxt, plan[i][1])] + plan[i + 1 :]
            if fits(trial):
                plan = trial
                break
        else:
            return plan


def _upgrade_ranks(plan: Layers, order: list[int], nz: list[int], fits: Callable[[Layers], bool]) -> Layers:
    """``plan`` with ranks raised one step each, most important layer (``order``) first, while it fits."""
    plan = list(plan)
    for i in order:
        b, r = plan[i]
        if 0 < r < nz[-1]:
            trial = plan[:i] + [(b, nz[nz.index(r) + 1])] + plan[i + 1 :]
            if fits(trial):
                plan = trial
    return plan


def repair(
    layers: Layers,
    sensitivity: dict[int, list[float]],
    importance: list[float],
    bits: Sequence[int],
    ranks: Sequence[int],
    fits: Callable[[Layers], bool],
    memory: Callable[[Layers], float] | None = None,
) -> Layers | None:
    """An over-budget plan made to fit by the cheapest downgrades, or None if none does (e.g. no adapter).

    Bit-widths go first: the layer whose calibrated KL rises least moves one bit-width down. Only when
    every layer is at the lowest bit-width do ranks go, one step at a time, from the layer with the
    least rank importance (the measurements in the README show rank is the dearer thing to cut) per
    byte the step frees, when ``memory`` is given: under a peak budget, removing an adapter also frees
    the activations its layer kept. NSGA-II's random proposals over 30 layers almost never fit a tight
    budget; repaired, they train."""
    plan, bits, ranks = list(layers), sorted(bits), sorted(ranks)

    def freed(i: int, new: tuple[int, int]) -> float:
        return max(memory(plan) - memory(plan[:i] + [new] + plan[i + 1 :]), 1.0) if memory else 1.0

    def sens(b: int, i: int) -> float:
        return 0.0 if b == 16 else sensitivity.get(b, [0.0] * len(plan))[i]

    while not fits(plan):
        cands = [
            (sens(bits[bits.index(b) - 1], i) - sens(b, i), i, (bits[bits.index(b) - 1], r))
            for i, (b, r) in enumerate(plan)
            if b != bits[0]
        ]
        if not cands:
            cands = [
                (importance[i] * (r - lower) / freed(i, (b, lower)), i, (b, lower))
                for i, (b, r) in enumerate(plan)
                if r != ranks[0]
                for lower in [ranks[ranks.index(r) - 1]]
            ]
        if not cands:
            return None
        _, i, new = min(cands)
        plan[i] = new
    return plan


def is_uniform(layers: Layers) -> bool:
    """One bit-width and one rank in every layer (QLoRA's shape of plan)."""
    return len(set(layers)) == 1


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both objectives (both minimized), by the first."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])
