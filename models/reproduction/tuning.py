"""Grid search that grows its grid until the chosen point is inside it (baselines.py's tuning).

Each parameter of a filter is an Axis: its starting values (ascending) and how the grid grows
past either end: "mul" multiplies or divides by `step`, "add" adds or subtracts `step`,
"fixed" never grows (a parameter with a few meaningful values). `low` and `high` bound the
parameter's domain (a window of 3 is the smallest, dt <= 1/4, ...).

grid_search(axes, score): evaluate score(params) on the full product of the grids and take the
best point (ties: the first in the product's order). While some parameter of the best point
sits on an end of its grid that can still grow, add the next value beyond that end (for every
such parameter) and evaluate the new points of the product (points are cached); at most
`max_rounds` rounds. The result says, per parameter, whether the chosen value is:
  - "edge":  on an end of its grid that could still grow, after max_rounds (the optimum may lie
    beyond: the tables mark it);
  - "bound": on the parameter's domain bound (it cannot go further; also marked);
  - None:    inside its grid, or a fixed axis.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

MAX_ROUNDS = 8


@dataclass(frozen=True)
class Axis:
    values: tuple
    grow: str = "mul"
    step: float = 2.0
    low: float = -math.inf
    high: float = math.inf
    integer: bool = False

    def __post_init__(self):
        if self.grow not in ("mul", "add", "fixed"):
            raise ValueError(f"Axis.grow must be mul, add or fixed, got {self.grow!r}")
        if not self.values or list(self.values) != sorted(set(self.values)):
            raise ValueError(f"Axis.values must be ascending and distinct, got {self.values!r}")
        if any(v < self.low or v > self.high for v in self.values):
            raise ValueError(f"Axis.values {self.values!r} outside [{self.low}, {self.high}]")

    def _fit(self, v: float):
        if self.integer:
            v = int(round(v))
        return v if self.low <= v <= self.high else None

    def below(self, v):
        """The next value below v, or None at the bound (or for a fixed axis)."""
        if self.grow == "fixed":
            return None
        nxt = self._fit(v / self.step if self.grow == "mul" else v - self.step)
        return nxt if nxt is not None and nxt < v else None

    def above(self, v):
        if self.grow == "fixed":
            return None
        nxt = self._fit(v * self.step if self.grow == "mul" else v + self.step)
        return nxt if nxt is not None and nxt > v else None

    def with_high(self, high: float) -> "Axis":
        """The same axis with a lower upper bound (values above it dropped)."""
        high = min(self.high, high)
        kept = tuple(v for v in self.values if v <= high) or (self.values[0],)
        return Axis(kept, self.grow, self.step, self.low, max(high, kept[-1]), self.integer)


def _clean(v):
    """Grid values without float noise (0.1 * 2 * 2 ... stays readable in tables)."""
    return v if isinstance(v, int) else float(f"{v:.6g}")


def grid_search(axes: dict, score: Callable[[dict], float], *, max_rounds: int = MAX_ROUNDS) -> dict:
    """{"params", "score", "grid" (final values per axis), "marks" (per axis: edge, bound or
    None), "evaluated" (points), "rounds", "scores" (every point: [params, score])}."""
    if not axes:
        raise ValueError("grid_search needs at least one axis")
    names = list(axes)
    grids = {n: [_clean(v) for v in axes[n].values] for n in names}
    scores: dict[tuple, float] = {}
    rounds = 0
    while True:
        for point in itertools.product(*(grids[n] for n in names)):
            if point not in scores:
                value = float(score(dict(zip(names, point))))
                scores[point] = value if math.isfinite(value) else -math.inf
        best = max(itertools.product(*(grids[n] for n in names)), key=lambda p: scores[p])
        grew = False
        if rounds < max_rounds:
            for n, v in zip(names, best):
                g, axis = grids[n], axes[n]
                if v == g[0] and (nxt := axis.below(v)) is not None:
                    g.insert(0, _clean(nxt))
                    grew = True
                elif v == g[-1] and (nxt := axis.above(v)) is not None:
                    g.append(_clean(nxt))
                    grew = True
        if not grew:
            break
        rounds += 1
    marks = {}
    for n, v in zip(names, best):
        g, axis = grids[n], axes[n]
        if axis.grow == "fixed" or g[0] < v < g[-1]:
            marks[n] = None
        else:
            can_grow = ((v == g[0] and axis.below(v) is not None)
                        or (v == g[-1] and axis.above(v) is not None))
            marks[n] = "edge" if can_grow else "bound"
    return {"params": dict(zip(names, best)), "score": scores[best], "grid": grids,
            "marks": marks, "evaluated": len(scores), "rounds": rounds,
            "scores": [[dict(zip(names, p)), s] for p, s in scores.items()]}
