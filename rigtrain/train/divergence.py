"""The rules that stop a run which can no longer learn, judged at logging steps (every
checkpoint step is one) before anything is saved (docs/training.md, "Faults and what they
cost"). A mixin of the Trainer."""

from __future__ import annotations

import math
from collections import deque

from rigtrain.train.run_record import resume_command


def recent_losses() -> deque[float]:
    """The last 10 logged losses, whose median the explosion rule compares with (a long
    run keeps ten, not every one)."""
    return deque(maxlen=10)


class DivergenceRules:
    def _check_divergence(self, in_a_row: int, total: int, metrics: dict[str, float]) -> None:
        """At each logging step (every checkpoint step is one), the rules that stop a run
        which can no longer learn, before it saves: the loss not finite for
        train.max_nonfinite_steps steps in a row; the update skipped (an inf/NaN gradient;
        skipping.py) for train.max_skipped_steps steps in a row; the loss above
        train.divergence_factor times the median of the last 10 logged losses. Every rank
        sees the same figures, so all stop after the same step."""
        t = self.config.train
        if total != self.nonfinite_reported:
            metrics["nonfinite_steps"] = total
            if self.log:
                self.log.say(
                    f"warning: {total - self.nonfinite_reported} step(s) up to step {self.step} had a loss "
                    f"that is not finite ({in_a_row} in a row now, {total} in all)"
                )
            self.nonfinite_reported = total
        skipped_in_a_row, skipped = self.skipped.read()
        if skipped:
            metrics["skipped_steps"] = skipped
        loss = metrics.get("loss", 0.0)
        recent = sorted(self.recent_losses)
        median = recent[len(recent) // 2] if recent else None
        why = None
        if in_a_row >= t.max_nonfinite_steps:
            why = f"the loss was not finite for {in_a_row} steps in a row up to step {self.step}"
        elif skipped_in_a_row >= t.max_skipped_steps:
            why = (
                f"the last {skipped_in_a_row} updates up to step {self.step} were skipped (their gradients were inf "
                "or NaN)"
            )
        elif t.divergence_factor and median and math.isfinite(loss) and loss > t.divergence_factor * median:
            why = (
                f"the loss exploded at step {self.step}: {loss:.4g}, more than {t.divergence_factor:g} times the "
                f"median of the last {len(recent)} logged ({median:.4g}; train.divergence_factor)"
            )
        if math.isfinite(loss):
            self.recent_losses.append(loss)
        if why:
            last_good = self._last_good()
            # with nothing saved, --resume keeps the run folder and its record and starts at step 0
            restart = " (it starts again at step 0)" if "no checkpoint" in last_good else ""
            self.diverged = (
                f"{why}; {last_good}; lower train.lr (now {t.lr:g}) or raise "
                f"train.warmup_steps, then `{resume_command(self.run_dir, '--set', 'train.lr=...')}`{restart}"
            )
