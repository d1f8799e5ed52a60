r"""Seed statistics: Student-t confidence intervals of a mean, and interval comparisons.

With n seeds x_1..x_n (sample mean m, sample standard deviation s with n - 1 in the
denominator), the two-sided level-(1 - alpha) interval of the mean is

  m +- t_{1 - alpha/2, n-1} * s / sqrt(n),

t_{q, nu} the q-quantile of Student's t with nu degrees of freedom (e.g. t_{0.975, 2} = 4.303:
three seeds give an interval 2.48 s wide on each side). Two optimizers are called different only
when their intervals are disjoint (a conservative rule: disjoint 95% intervals imply a Welch test
at well below 5%); otherwise they tie. One seed gives no interval and no comparison.

The t quantile inverts the t CDF, F(t) = 1 - I_{nu/(nu+t^2)}(nu/2, 1/2) / 2 for t >= 0, with I
the regularized incomplete beta function (continued fraction, Numerical Recipes 6.4), by
bisection; scipy is not a dependency.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

LEVEL = 0.95  # Every interval of the report.


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (modified Lentz)."""
  tiny, eps = 1e-300, 1e-15
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 500):
    m2 = 2 * m
    for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
               -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
      d = 1.0 + aa * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + aa / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < eps:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                   + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _betacf(a, b, x) / a
  return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with ``df`` degrees of freedom."""
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
  return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
  """The q-quantile of Student's t with ``df`` > 0 degrees of freedom (bisection on t_cdf)."""
  if not 0.0 < q < 1.0 or df <= 0:
    raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
  if q < 0.5:
    return -t_quantile(1.0 - q, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < q:
    hi *= 2.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if t_cdf(mid, df) < q:
      lo = mid
    else:
      hi = mid
    if hi - lo < 1e-12 * max(1.0, hi):
      break
  return 0.5 * (lo + hi)


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
