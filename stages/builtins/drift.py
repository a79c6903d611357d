"""Drift detection on an error stream: the Page-Hinkley test (Page 1954; Hinkley 1971).

Fed one value per scored record (0/1 for a classification mistake, the absolute error for a
regression), it signals when the mean of the stream has *increased* by more than chance allows,
that is when the model got worse. It keeps the running mean ``x̄`` of the values since the last
reset and the cumulative deviation ``m_t = Σ (x_i - x̄_i - delta)`` with its running minimum
``M_t``; drift is ``m_t - M_t > threshold`` once ``min_instances`` values were seen. After a
signal the detector resets, so it measures the new regime from there.

- ``delta`` is the change in the mean too small to care about; it makes ``m_t`` drift down
  while nothing happens, so noise does not add up to an alarm.
- ``threshold`` (lambda) trades detection delay for false alarms. The defaults are tuned for
  0/1 errors: on a Bernoulli error stream with rate 0.05-0.3, 50k stationary values gave 0-1
  false alarms, and a jump of the error rate from 0.08 to 0.7 was signalled ~70 values later.
  For a regression error, scale ``threshold`` (and ``delta``) to the size of the errors.
- ``alpha`` < 1 fades old deviations (river's variant); 1 (the default) is the textbook test:
  fading lets ``m_t`` creep back up to 0 while ``M_t`` stays down, which raises false alarms on
  long stationary streams.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> calm = (rng.random(5000) < 0.1).astype(float)           # 10 % errors all along
>>> PageHinkley().update_many(calm)
[]
>>> worse = (rng.random(1000) < 0.6).astype(float)           # then 60 % errors
>>> ph = PageHinkley(); [i for i in ph.update_many(np.r_[calm, worse]) if i >= 5000][:1]
[5097]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class PageHinkley:
    """Page-Hinkley test for an increase in the mean of a stream."""

    def __init__(self, delta: float = 0.005, threshold: float = 50.0, min_instances: int = 30,
                 alpha: float = 1.0) -> None:
        if threshold <= 0 or delta < 0 or not 0 < alpha <= 1 or min_instances < 1:
            raise ValueError("Page-Hinkley needs threshold > 0, delta >= 0, 0 < alpha <= 1, min_instances >= 1")
        self.delta, self.threshold, self.min_instances, self.alpha = float(delta), float(threshold), int(min_instances), float(alpha)
        self.detections = 0
        self.reset()

    def reset(self) -> None:
        """Forget the stream so far (done after each detection)."""
        self.n = 0
        self.mean = 0.0
        self.cumulative = 0.0
        self.minimum = 0.0

    @property
    def statistic(self) -> float:
        """``m_t - M_t``: how far the stream has risen above its best; drift when > threshold."""
        return self.cumulative - self.minimum

    def update(self, x: float) -> bool:
        """Add one value; True when it completes a detection (the detector then resets)."""
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self.cumulative = self.alpha * self.cumulative + (x - self.mean - self.delta)
        if self.cumulative < self.minimum:
            self.minimum = self.cumulative
        if self.n >= self.min_instances and self.cumulative - self.minimum > self.threshold:
            self.detections += 1
            self.reset()
            return True
        return False

    def update_many(self, xs: Iterable[float]) -> list[int]:
        """Add values in order; the positions (in ``xs``) at which drift was detected."""
        update = self.update
        return [i for i, x in enumerate(xs) if update(float(x))]

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "cumulative": self.cumulative, "minimum": self.minimum,
                "detections": self.detections}
