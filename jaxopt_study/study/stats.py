r"""Seed statistics: Student-t confidence intervals of a mean, and interval comparisons.

With n seeds x_1..x_n (sample mean m, sample standard deviation s with n - 1 in the
denominator), the two-sided level-(1 - alpha) interval of the mean is

  m +- t_{1 - alpha/2, n-1} * s / sqrt(n),

t_{q, nu} the q-quantile of Student's t with nu degrees of freedom (e.g. t_{0.975, 2} = 4.303:
three seeds give an interval 2.48 s wide on each side). Two optimizers are called different only
when their intervals are disjoint (a conservative rule: disjoint 95% intervals imply a Welch test
at well below 5%); otherwise they tie. One seed gives no interval and no comparison.

The t quantile is ``scipy.stats.t.ppf``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

import scipy.stats

LEVEL = 0.95  # Every interval of the report.


def t_quantile(q: float, df: float) -> float:
  """The q-quantile of Student's t with ``df`` > 0 degrees of freedom."""
  if not 0.0 < q < 1.0 or df <= 0:
    raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
  return float(scipy.stats.t.ppf(q, df))


@dataclasses.dataclass(frozen=True)
class MeanCI:
  """Mean of n values with its two-sided Student-t interval (half_width None when n < 2)."""

  mean: Optional[float]
  half_width: Optional[float]
  n: int
  level: float = LEVEL

  @property
  def lo(self) -> Optional[float]:
    return None if self.half_width is None else self.mean - self.half_width

  @property
  def hi(self) -> Optional[float]:
    return None if self.half_width is None else self.mean + self.half_width

  def format(self, digits: int = 3) -> str:
    """'3.210 ± 0.045 (95% t, n=3)'; '3.210 (n=1, no interval)'; '–' without values."""
    if self.mean is None:
      return "–"
    if self.half_width is None:
      return f"{self.mean:.{digits}f} (n={self.n}, no interval)"
    return (f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} "
            f"({100 * self.level:g}% t, n={self.n})")


def mean_ci(values: Iterable[Optional[float]], level: float = LEVEL) -> MeanCI:
  """The mean of the finite values and its Student-t interval (module docstring)."""
  xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  n = len(xs)
  if n == 0:
    return MeanCI(None, None, 0, level)
  mean = sum(xs) / n
  if n < 2:
    return MeanCI(mean, None, n, level)
  sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
  return MeanCI(mean, t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n), n, level)


def compare(a: MeanCI, b: MeanCI) -> Optional[str]:
  """'lower' (a's interval entirely below b's), 'higher', 'tie' (they overlap), or None.

  None when either side has no interval (fewer than 2 values): no comparison is possible.
  """
  if a.half_width is None or b.half_width is None:
    return None
  if a.hi < b.lo:
    return "lower"
  if a.lo > b.hi:
    return "higher"
  return "tie"
