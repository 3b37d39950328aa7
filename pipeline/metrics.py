"""Every metric of docs/design.md ("Metrics"), as pure functions of learning curves; no Ray, no I/O.

    curve = Curve.from_results(trial_frame)                  # one evaluation trial's Tune results
    row = per_seed_metrics(history, teacher, imitator, snapshot, cutoff_step=c, horizon_steps=H)
    table = summarise(pandas.DataFrame(rows))                # one row per (env, cutoff): CIs + verdict

A `Curve` is one run's episodes: `end_step[i]` is the number of env steps the run had taken when
episode i ended (CleanRL's `global_step`, what the trials report as `charts/env_steps`), and
`episode_return[i]` its undiscounted return. The evaluation arms count steps from 0 = the cutoff.

Windows: a "W-episode mean" is the mean return of W consecutive episodes (default `WINDOW`). When
fewer than W episodes exist, it is the mean of those that exist; with none it is NaN. NaN means "no
data" everywhere in this module, and `verdict`/`summarise` turn it into an explicit missing status
instead of averaging fewer seeds.

Metric and Tune metric names are defined here once; the rest of the package imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import stats

# Tune / TensorBoard names each evaluation trial reports, once per finished episode (CleanRL style).
EPISODIC_RETURN = "charts/episodic_return"
EPISODIC_LENGTH = "charts/episodic_length"
ENV_STEPS = "charts/env_steps"  # env steps the arm has taken, from 0 at the cutoff
TRIAL_FINISHED = "trial/finished"  # in a Tune trial's last report only: every unit ran its whole horizon
UNIT = "unit"  # in each episode's report: the trial_id of the unit (plan.TrialSpec) the episode belongs to

# Defaults.
WINDOW = 10  # episodes in a W-episode mean
CONFIDENCE = 0.95  # two-sided intervals over seeds (mean_ci, fieller_interval)

# Per-seed metrics (columns of the per-seed frame; estimates in the summary).
L_C = "teacher_return_at_cutoff"  # mean of the teacher's last W episodes before the cutoff
B_C = "pre_cutoff_best"  # best W-episode mean before the cutoff: the ceiling the imitator saw
B_C_DEBIASED = "pre_cutoff_best_debiased"  # B_c chosen on half the episodes, measured on the other half
GAIN_TEACHER = "gain_teacher"  # continued teacher's final W-episode mean - L_c
GAIN_IMITATOR = "gain_imitator"  # imitator's final W-episode mean - L_c
CEILING_EXCEEDANCE = "ceiling_exceedance"  # imitator final - de-biased B_c
SNAPSHOT_FIDELITY = "snapshot_fidelity"  # imitator first-W mean / L_c
FIDELITY = "fidelity"  # (imitator first-W mean - random final) / (L_c - random final)
IN_DATA_RATIO = "in_data_ratio"  # in-data control: its gain from L_c' over the teacher's recorded gain L_c - L_c'
IMITATOR_DRIFT = "imitator_drift"  # imitator final - its first-W mean (below 0 with its CI: it degrades)
FIRST_IMITATOR = "first_return_imitator"  # imitator first-W mean (fidelity's numerator)
FINAL_TEACHER = "final_return_teacher"  # final W-episode mean of each arm after H steps
FINAL_IMITATOR = "final_return_imitator"
FINAL_SNAPSHOT = "final_return_snapshot"
FINAL_RANDOM = "final_return_random"
FINAL_IN_DATA = "final_return_in_data"  # the in-data control's final W-episode mean (reaching the cutoff)
TRANSFER_AUC_RATIO = "transfer_auc_ratio"  # AUC(imitator) / AUC(teacher from scratch), held-out env
PER_SEED_METRICS = (L_C, B_C, B_C_DEBIASED, GAIN_TEACHER, GAIN_IMITATOR, CEILING_EXCEEDANCE, SNAPSHOT_FIDELITY,
                    FIDELITY, IN_DATA_RATIO, IMITATOR_DRIFT, FIRST_IMITATOR, FINAL_TEACHER, FINAL_IMITATOR,
                    FINAL_SNAPSHOT, FINAL_RANDOM, FINAL_IN_DATA, TRANSFER_AUC_RATIO)

# Group-level results (summary columns).
EXTRAPOLATION_RATIO = "extrapolation_ratio"  # mean(gain_imitator) / mean(gain_teacher)
EXTRAPOLATION_RATIO_REASON = "extrapolation_ratio_reason"  # "" when reported, else why it is NaN
VERDICT = "verdict"
VERDICT_REASON = "verdict_reason"  # the numbers behind the rung the ladder stopped at
DEGRADES = "degrades"  # the imitator ends significantly below its own start (beside the verdict)
N_SEEDS = "n_seeds"  # seeds with a row in the group
MISSING_SEEDS = "missing_seeds"  # expected seeds without every value the verdict needs
LOW, HIGH, COUNT = "_low", "_high", "_n"  # suffixes: CI bounds and number of finite seeds

# Keys of the per-seed frame.
ENV = "env"
CUTOFF = "cutoff"
SEED = "seed"

# Verdicts: the rungs of the ladder (extrapolation_verdict), in order. Missing reads "missing: seeds [3, 4]".
MISSING = "missing"
NOT_TESTABLE = "not testable here"
IMITATION_FAILED = "imitation failed"
EXTRAPOLATES = "extrapolates"
DOES_NOT = "does not"
INCONCLUSIVE = "inconclusive"
VERDICT_INPUTS = (FINAL_IMITATOR, FINAL_TEACHER, GAIN_TEACHER, GAIN_IMITATOR, CEILING_EXCEEDANCE, IMITATOR_DRIFT)
IMITATION_CHECKS = (FIDELITY, IN_DATA_RATIO)  # ratios undefined for a seed whose denominator is 0


def ci_columns(metric: str) -> tuple[str, str, str]:
    """Summary column names of a metric's estimate, CI low and CI high."""
    return metric, metric + LOW, metric + HIGH


# --- curves ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Episodes of one run, in order: end_step (env steps taken when it ended) and its return."""

    end_step: np.ndarray  # (N,) non-decreasing
    episode_return: np.ndarray  # (N,)

    def __post_init__(self):
        end_step = np.asarray(self.end_step, dtype=np.int64).reshape(-1)
        episode_return = np.asarray(self.episode_return, dtype=np.float64).reshape(-1)
        if len(end_step) != len(episode_return):
            raise ValueError(f"Curve: {len(end_step)} end steps but {len(episode_return)} returns")
        if np.any(np.diff(end_step) < 0):
            raise ValueError("Curve: end_step must be non-decreasing")
        if not np.all(np.isfinite(episode_return)):
            raise ValueError("Curve: episode returns must be finite")
        object.__setattr__(self, "end_step", end_step)
        object.__setattr__(self, "episode_return", episode_return)

    def __len__(self) -> int:
        return len(self.end_step)

    def upto(self, step: int | None) -> Curve:
        """The episodes finished within the first `step` env steps (end_step <= step); None: all."""
        if step is None:
            return self
        keep = self.end_step <= step
        return Curve(self.end_step[keep], self.episode_return[keep])

    @classmethod
    def from_transitions(cls, step: np.ndarray, reward: np.ndarray, done: np.ndarray) -> Curve:
        """Episodes of a recorded history (schema columns `step`, `reward`, `terminated | truncated`),
        rows in step order starting at an episode start; an unfinished last episode is dropped.
        An episode whose last row has step s gets end_step s + 1."""
        ends = np.flatnonzero(np.asarray(done, dtype=bool))
        totals = np.cumsum(np.asarray(reward, dtype=np.float64))[ends]
        return cls(np.asarray(step)[ends] + 1, np.diff(totals, prepend=0.0))

    @classmethod
    def from_results(cls, frame: pd.DataFrame) -> Curve:
        """One trial's reported results (columns ENV_STEPS, EPISODIC_RETURN); rows without a return are skipped."""
        rows = frame.dropna(subset=[EPISODIC_RETURN]).sort_values(ENV_STEPS, kind="stable")
        return cls(rows[ENV_STEPS].to_numpy(), rows[EPISODIC_RETURN].to_numpy())


# --- W-episode means ---------------------------------------------------------------------------


def window_mean(returns: np.ndarray, window: int = WINDOW) -> float:
    """Mean of the last `window` returns (all of them if fewer; NaN if none)."""
    returns = np.asarray(returns, dtype=np.float64)
    return float(returns[-window:].mean()) if len(returns) else float("nan")


def last_window_mean(curve: Curve, by_step: int | None, window: int = WINDOW) -> float:
    """Mean of the last W episodes finished by env step `by_step` (end_step <= by_step)."""
    return window_mean(curve.upto(by_step).episode_return, window)


def best_window_mean(curve: Curve, by_step: int | None, window: int = WINDOW) -> float:
    """max_i mean(r[i : i+W]) over the episodes finished by `by_step`; mean of all if fewer than W."""
    returns = curve.upto(by_step).episode_return
    if len(returns) <= window:
        return window_mean(returns, window)
    sums = np.cumsum(np.concatenate([[0.0], returns]))
    return float(((sums[window:] - sums[:-window]) / window).max())


def debiased_best_window_mean(curve: Curve, by_step: int | None, window: int = WINDOW) -> float:
    """B_c without the max's upward bias (the max over many noisy windows of one curve lies above
    the level it found): the episodes split into even- and odd-numbered halves; the best window of
    W/2 episodes of one half (spanning W episodes of the curve) chosen there and its mean measured
    at the same place in the other half; both ways, averaged. Fewer than W episodes: their mean."""
    returns = curve.upto(by_step).episode_return
    halves, half = (returns[0::2], returns[1::2]), max(1, window // 2)
    n = len(halves[1])
    if n < half or len(returns) < window:
        return window_mean(returns, window)
    estimates = []
    for choose, measure in (halves, halves[::-1]):
        means = np.convolve(choose[:n], np.ones(half) / half, mode="valid")  # (n - W/2 + 1,)
        best = int(means.argmax())
        estimates.append(float(measure[best:best + half].mean()))
    return float(np.mean(estimates))


def first_window_mean(curve: Curve, window: int = WINDOW) -> float:
    """Mean of the first W episodes."""
    return window_mean(curve.episode_return[:window], window)


def final_window_mean(curve: Curve, window: int = WINDOW) -> float:
    """Mean of the last W episodes."""
    return window_mean(curve.episode_return, window)


# --- per seed ----------------------------------------------------------------------------------


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 or NaN (undefined, not infinite)."""
    if not np.isfinite(denominator) or denominator == 0:
        return float("nan")
    return float(numerator / denominator)


def per_seed_metrics(history: Curve, teacher: Curve | None, imitator: Curve | None, snapshot: Curve | None,
                     *, cutoff_step: int | None = None, horizon_steps: int | None = None,
                     random: Curve | None = None, in_data: Curve | None = None, prime_step: int | None = None,
                     window: int = WINDOW) -> dict[str, float]:
    """The metrics of one (env, cutoff, seed).

    history: the teacher's recorded episodes; only those finished by `cutoff_step` count (None: the
        curve is already the pre-cutoff part). Arms (continued teacher, imitator, frozen snapshot,
        random) count steps from 0 = the cutoff; only episodes finished by `horizon_steps` count
        (None: all). A missing arm (None) makes its metrics NaN, which the verdict reports as missing.
        in_data: the in-data control, the imitator primed at `prime_step` c' < c and rolled out to
        c (its own steps from 0 = c').

        L_c = mean of the last W pre-cutoff episodes      B_c = best W-episode pre-cutoff mean
        gain_arm = final_W(arm) - L_c                      ceiling exceedance = final_W(imitator) - de-biased B_c
        snapshot fidelity = first_W(imitator) / L_c       (NaN when L_c == 0)
        fidelity = (first_W(imitator) - final_W(random)) / (L_c - final_W(random))
        in-data ratio = (final_W(in_data) - L_c') / (L_c - L_c')   imitator drift = final_W(imitator) - first_W(imitator)
    """
    pre = history.upto(cutoff_step)

    def final(arm: Curve | None) -> float:
        return final_window_mean(arm.upto(horizon_steps), window) if arm is not None else float("nan")

    l_c, b_c = last_window_mean(pre, None, window), best_window_mean(pre, None, window)
    b_c_debiased = debiased_best_window_mean(pre, None, window)
    first = first_window_mean(imitator, window) if imitator is not None else float("nan")
    l_prime = last_window_mean(history, prime_step, window) if prime_step is not None else float("nan")
    in_data_final = final_window_mean(in_data, window) if in_data is not None else float("nan")
    return {
        L_C: l_c,
        B_C: b_c,
        B_C_DEBIASED: b_c_debiased,
        GAIN_TEACHER: final(teacher) - l_c,
        GAIN_IMITATOR: final(imitator) - l_c,
        CEILING_EXCEEDANCE: final(imitator) - b_c_debiased,
        SNAPSHOT_FIDELITY: ratio(first, l_c),
        FIDELITY: ratio(first - final(random), l_c - final(random)),
        IN_DATA_RATIO: ratio(in_data_final - l_prime, l_c - l_prime),
        IMITATOR_DRIFT: final(imitator) - first,
        FIRST_IMITATOR: first,
        FINAL_TEACHER: final(teacher),
        FINAL_IMITATOR: final(imitator),
        FINAL_SNAPSHOT: final(snapshot),
        FINAL_RANDOM: final(random),
        FINAL_IN_DATA: in_data_final,
    }


def auc(curve: Curve, horizon_steps: int) -> float:
    """(1/H) * integral over [0, H] of the return as a step function of env steps.

    Each episode's return holds from its end until the next episode's end; before the first end the
    first return holds (the first measurement, not 0, so negative-return envs are not flattered).
    Episodes ending after H are ignored; NaN if none ends by H. A constant curve has AUC = constant.
    """
    curve = curve.upto(horizon_steps)
    if len(curve) == 0 or horizon_steps <= 0:
        return float("nan")
    widths = np.diff(np.concatenate([[0], curve.end_step, [horizon_steps]]))  # (N+1,)
    values = np.concatenate([curve.episode_return[:1], curve.episode_return])  # (N+1,)
    return float((widths * values).sum() / horizon_steps)


def transfer_auc_ratio(imitator: Curve, scratch_teacher: Curve, horizon_steps: int) -> float:
    """AUC(imitator) / AUC(teacher learning the held-out env from scratch), both over [0, H].
    NaN unless the teacher's AUC is positive (the ratio means nothing otherwise)."""
    denominator = auc(scratch_teacher, horizon_steps)
    return ratio(auc(imitator, horizon_steps), denominator) if denominator > 0 else float("nan")


# --- over seeds --------------------------------------------------------------------------------


def _finite(values: Iterable[float]) -> np.ndarray:
    values = np.asarray(values if hasattr(values, "__len__") else list(values), dtype=np.float64)
    return values[np.isfinite(values)]


def _t_quantile(n, confidence: float):
    """The two-sided Student-t quantile for n values (n may be an array, each >= 2)."""
    return stats.t.ppf((1 + confidence) / 2, np.asarray(n) - 1)


def t_half_width(std, n, confidence: float = CONFIDENCE):
    """Half the width of the t-interval of a mean of n values with sample std `std` (arrays work)."""
    return _t_quantile(n, confidence) * np.asarray(std) / np.sqrt(n)


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) over seeds, NaNs dropped: the two-sided Student-t interval. Chosen over the
    percentile bootstrap because it covers at the few seeds a run has (measured in
    tests/test_metrics.py, test_intervals_cover_at_the_seeds_runs_have; docs/design.md). One value:
    (value, NaN, NaN), as one seed has no spread; none: all NaN."""
    values = _finite(values)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(t_half_width(values.std(ddof=1), len(values), confidence))
    return mean, mean - half, mean + half


def fieller_interval(numerator: np.ndarray, denominator: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Fieller's interval for mean(numerator) / mean(denominator) over paired seeds: the ratios r for
    which the t-interval of the paired differences numerator - r * denominator holds 0. (NaN, NaN)
    unless the denominator's mean is significantly away from 0 (the interval is then unbounded)."""
    n, q = len(numerator), float(_t_quantile(len(numerator), confidence))
    (var_n, cov), (_, var_d) = np.cov(numerator, denominator, ddof=1) * q**2 / n  # of the means, times q^2
    mean_n, mean_d = float(numerator.mean()), float(denominator.mean())
    a, b, c = mean_d**2 - var_d, -2 * (mean_n * mean_d - cov), mean_n**2 - var_n  # a r^2 + b r + c <= 0
    discriminant = b * b - 4 * a * c
    if a <= 0 or discriminant < 0:
        return float("nan"), float("nan")
    root = np.sqrt(discriminant)
    return float((-b - root) / (2 * a)), float((-b + root) / (2 * a))


class RatioEstimate(NamedTuple):
    estimate: float
    low: float
    high: float
    reason: str  # "" when reported, else why the numbers are NaN


def extrapolation_ratio(gain_imitator: Sequence[float], gain_teacher: Sequence[float],
                        confidence: float = CONFIDENCE) -> RatioEstimate:
    """mean(gain_imitator) / mean(gain_teacher) over paired seeds, with Fieller's interval.

    Reported only where the teacher's gain is significantly positive (its t-interval low > 0);
    seeds missing either gain are dropped from the pairing.
    """
    gi, gt = np.asarray(gain_imitator, dtype=np.float64), np.asarray(gain_teacher, dtype=np.float64)
    paired = np.isfinite(gi) & np.isfinite(gt)
    gi, gt = gi[paired], gt[paired]
    nan = float("nan")
    if len(gt) < 2:
        return RatioEstimate(nan, nan, nan, f"fewer than 2 seeds with both gains ({len(gt)})")
    _, teacher_low, _ = mean_ci(gt, confidence)
    if not teacher_low > 0:
        return RatioEstimate(nan, nan, nan, f"teacher gain not significantly positive (CI low {teacher_low:.3g})")
    return RatioEstimate(float(gi.mean() / gt.mean()), *fieller_interval(gi, gt, confidence), "")


def _plain(seed: Any) -> Any:
    return seed.item() if isinstance(seed, np.generic) else seed


def missing_seeds(expected_seeds: Iterable[Any], present_seeds: Iterable[Any]) -> list[Any]:
    """Expected seeds that are not present, sorted."""
    present = {_plain(s) for s in present_seeds}
    return sorted({_plain(s) for s in expected_seeds} - present)


def missing_status(missing: Sequence[Any]) -> str:
    """The verdict that replaces a comparison when data is missing: 'missing: seeds [3, 4]'."""
    return f"{MISSING}: seeds {list(missing)}" if len(missing) else f"{MISSING}: no seeds"


def verdict(imitator_final: Sequence[float], teacher_final: Sequence[float], ceiling: Sequence[float],
            seeds: Sequence[Any] | None = None, expected_seeds: Iterable[Any] | None = None,
            confidence: float = CONFIDENCE) -> str:
    """EXTRAPOLATES, DOES_NOT, INCONCLUSIVE, or 'missing: seeds [...]', from paired per-seed values.

    The three sequences are aligned with `seeds` (default 0..n-1). A seed is present only if all
    three of its values are finite; if any expected seed (default: `seeds`) is not, or there are
    none, the verdict is the missing status: no verdict is drawn over fewer seeds.
        extrapolates: CI of (imitator final - B_c) is above 0
        does not:     not extrapolates, and CI of (imitator final - continued teacher final) is below 0
        inconclusive: otherwise (including one seed, which has no CI)
    """
    imitator, teacher, b_c = (np.asarray(v, dtype=np.float64) for v in (imitator_final, teacher_final, ceiling))
    if not len(imitator) == len(teacher) == len(b_c):
        raise ValueError(f"verdict: {len(imitator)}, {len(teacher)}, {len(b_c)} values; one per seed expected")
    seeds = list(range(len(imitator))) if seeds is None else list(seeds)
    present = [s for s, ok in zip(seeds, np.isfinite(imitator) & np.isfinite(teacher) & np.isfinite(b_c)) if ok]
    missing = missing_seeds(seeds if expected_seeds is None else expected_seeds, present)
    if missing or not present:
        return missing_status(missing)
    _, above_low, _ = mean_ci(imitator - b_c, confidence)
    if above_low > 0:
        return EXTRAPOLATES
    _, _, behind_high = mean_ci(imitator - teacher, confidence)
    return DOES_NOT if behind_high < 0 else INCONCLUSIVE


@dataclass
class VerdictRules:
    """The thresholds of the verdict ladder; a preset sets them as evaluate.verdict (config.py)."""

    fidelity: float = 0.5  # imitation failed: mean fidelity over seeds below this
    in_data: float = 0.5  # imitation failed: mean in-data ratio over seeds below this
    margin: float = 0.25  # does not extrapolate: the extrapolation ratio's CI upper bound below this

    def __post_init__(self):
        for name in ("fidelity", "in_data", "margin"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], not {getattr(self, name)}")


class Verdict(NamedTuple):
    said: str  # a rung of the ladder
    reason: str  # the numbers behind it
    degrades: bool  # beside the rung: the imitator ends significantly below its own start


def _interval(values: np.ndarray, confidence: float) -> str:
    estimate, low, high = mean_ci(values, confidence)
    return f"{estimate:.3g} [{low:.3g}, {high:.3g}]" if np.isfinite(low) else f"{estimate:.3g} (one seed: no interval)"


def extrapolation_verdict(rows: pd.DataFrame, expected_seeds: Iterable[Any], rules: VerdictRules = VerdictRules(),
                          confidence: float = CONFIDENCE) -> Verdict:
    """The ladder over one comparison's per-seed rows (columns SEED, VERDICT_INPUTS, IMITATION_CHECKS),
    stopping at the first rung that applies:
      1 missing           an expected seed lacks one of VERDICT_INPUTS (a trial or history it needs)
      2 not testable here the continued teacher's gain is not significantly above 0 (CI low <= 0)
      3 imitation failed  mean fidelity < rules.fidelity, or mean in-data ratio < rules.in_data, over
                          the seeds where each is defined (not where the teacher's return at the cutoff
                          equals random's, or where it did not change from c' to c)
      4 extrapolates      the CI of imitator final - de-biased B_c is above 0
      5 does not          both checks of rung 3 were made and passed, and the extrapolation ratio's
                          interval (Fieller's) lies below rules.margin
      6 inconclusive      otherwise; the reason gives the largest ratio the interval leaves open, or
                          which check of rung 3 could not be made
    Beside the rung, degrades: the CI of the imitator's final minus its first-W return is below 0."""
    complete = np.logical_and.reduce([np.isfinite(rows[c].to_numpy(dtype=np.float64)) for c in VERDICT_INPUTS])
    missing = missing_seeds(expected_seeds, rows[SEED][complete])
    if missing or not complete.any():
        return Verdict(missing_status(missing), "the ladder needs every expected seed", False)
    values = {c: rows[c].to_numpy(dtype=np.float64)[complete] for c in (*VERDICT_INPUTS, *IMITATION_CHECKS)}
    degrades = mean_ci(values[IMITATOR_DRIFT], confidence)[2] < 0
    said = lambda rung, reason: Verdict(rung, reason, bool(degrades))  # noqa: E731
    if not mean_ci(values[GAIN_TEACHER], confidence)[1] > 0:
        return said(NOT_TESTABLE, f"continued teacher's gain {_interval(values[GAIN_TEACHER], confidence)} is not above 0")
    checks = {}  # check -> (mean over the seeds where it is defined, text)
    for check, threshold in ((FIDELITY, rules.fidelity), (IN_DATA_RATIO, rules.in_data)):
        defined = values[check][np.isfinite(values[check])]
        if len(defined):
            name = "fidelity" if check == FIDELITY else "in-data ratio"
            seeds = "" if len(defined) == len(values[check]) else f" (over {len(defined)} of {len(values[check])} seeds)"
            checks[check] = (float(defined.mean()), f"{name} {defined.mean():.2f}{seeds}")
            if defined.mean() < threshold:
                return said(IMITATION_FAILED, f"{checks[check][1]} < {threshold:g}")
    if mean_ci(values[CEILING_EXCEEDANCE], confidence)[1] > 0:
        return said(EXTRAPOLATES, f"imitator final - de-biased B_c {_interval(values[CEILING_EXCEEDANCE], confidence)} is above 0")
    found = extrapolation_ratio(values[GAIN_IMITATOR], values[GAIN_TEACHER], confidence)
    ratio_text = f"extrapolation ratio {found.estimate:.2f} [{found.low:.2f}, {found.high:.2f}]"
    unchecked = [what for check, what in ((FIDELITY, "no fidelity (L_c at random's level)"),
                                          (IN_DATA_RATIO, "no in-data control")) if check not in checks]
    if unchecked:
        return said(INCONCLUSIVE, f"{ratio_text}, but imitation is not verified: {', '.join(unchecked)}")
    if found.high < rules.margin:
        return said(DOES_NOT, f"{ratio_text} is below {rules.margin:g}; {checks[FIDELITY][1]}, {checks[IN_DATA_RATIO][1]}")
    return said(INCONCLUSIVE, f"{ratio_text}: ratios up to {found.high:.2f} are not ruled out at n = {int(complete.sum())}")


def summarise(per_seed: pd.DataFrame, by: Sequence[str] = (ENV, CUTOFF), expected_seeds: Iterable[Any] | None = None,
              confidence: float = CONFIDENCE, rules: VerdictRules = VerdictRules()) -> pd.DataFrame:
    """One row per group (default (env, cutoff)) from one row per (group, seed).

    Columns: the group keys; N_SEEDS; for each per-seed metric present, its mean with a t-interval,
    `_low`, `_high` and `_n` (finite seeds); the extrapolation ratio with its CI and
    EXTRAPOLATION_RATIO_REASON; and, when the frame has the verdict's inputs (final returns of
    imitator and teacher, ceiling exceedance, fidelity...), MISSING_SEEDS and the ladder's VERDICT,
    VERDICT_REASON and DEGRADES (extrapolation_verdict). Expected seeds default to every seed in the
    frame, so a seed absent from one group shows there as missing.
    """
    duplicated = per_seed.duplicated([*by, SEED])
    if duplicated.any():
        twice = per_seed[duplicated][[*by, SEED]].values.tolist()
        raise ValueError(f"summarise: more than one row per ({', '.join(by)}, seed): {twice}")
    expected = sorted({_plain(s) for s in per_seed[SEED]}) if expected_seeds is None else list(expected_seeds)
    metrics = [m for m in PER_SEED_METRICS if m in per_seed.columns]
    rows = []
    for keys, group in per_seed.groupby(list(by), dropna=False, sort=True):
        row: dict[str, Any] = dict(zip(by, keys))
        row[N_SEEDS] = int(group[SEED].nunique())
        for metric in metrics:
            row.update(zip(ci_columns(metric), mean_ci(group[metric], confidence)))
            row[metric + COUNT] = int(np.isfinite(group[metric].to_numpy(dtype=np.float64)).sum())
        if GAIN_IMITATOR in group and GAIN_TEACHER in group:
            estimate = extrapolation_ratio(group[GAIN_IMITATOR], group[GAIN_TEACHER], confidence)
            row.update(zip(ci_columns(EXTRAPOLATION_RATIO), estimate[:3]))
            row[EXTRAPOLATION_RATIO_REASON] = estimate.reason
        if all(column in group for column in (*VERDICT_INPUTS, *IMITATION_CHECKS)):
            inputs = group[list(VERDICT_INPUTS)].to_numpy(dtype=np.float64)
            row[MISSING_SEEDS] = missing_seeds(expected, group[SEED][np.isfinite(inputs).all(axis=1)])
            row[VERDICT], row[VERDICT_REASON], row[DEGRADES] = extrapolation_verdict(group, expected, rules, confidence)
        rows.append(row)
    return pd.DataFrame(rows)
