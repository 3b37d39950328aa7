"""The arms of the evaluation grid, in one registry: which tests run each arm, how the report labels
and colours it, and its rough cost. The plan reads it to
build the grid, evaluate to size and order the trials, the report to draw and tabulate them; an
arm's rollout is a function in pipeline/evaluate.py registered under the same name.

    ARMS["snapshot"].tests      # ("extrapolation",)
    arms_for(TRANSFER)          # the arms a transfer comparison has, imitator first
"""

from __future__ import annotations

from dataclasses import dataclass

# The tests (values of a trial's `test`): the cutoff test on the teachers' own tasks, the same
# imitators on held-out tasks or envs, and the full-history imitator on held-out tasks.
EXTRAPOLATION, TRANSFER, CONTROL = "extrapolation", "transfer", "control"
TESTS = (EXTRAPOLATION, TRANSFER, CONTROL)

IMITATOR, TEACHER, SNAPSHOT, RANDOM = "imitator", "teacher", "snapshot", "random"
# The in-data control: the cutoff imitator primed at an earlier step c' and rolled out from c' to
# the cutoff, an improvement its training data holds (plan.TrialSpec.prime_step).
IN_DATA = "in_data"


@dataclass(frozen=True)
class Arm:
    name: str
    tests: tuple[str, ...]  # tests whose comparisons have a trial of this arm per unit (seed)
    label: str  # legend and table label
    color: str  # matplotlib colour; imitator variants take theirs from IMITATOR_COLORS instead
    cost: int  # rough relative cost per env step: the longest trials start first
    scratch_label: str = ""  # label where it learns a held-out task from scratch, if it reads differently there


ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm(IMITATOR, TESTS, "imitator", "tab:red", cost=2),
    Arm(TEACHER, TESTS, "continued teacher", "tab:green", cost=4,
        scratch_label="teacher learning from scratch"),
    Arm(SNAPSHOT, (EXTRAPOLATION,), "frozen snapshot at cutoff", "tab:orange", cost=1),
    Arm(RANDOM, TESTS, "random policy", "tab:gray", cost=0),
    Arm(IN_DATA, (EXTRAPOLATION,), "imitator from c' (in-data control)", "tab:blue", cost=2),
)}
IMITATOR_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black")


def arms_for(test: str) -> tuple[str, ...]:
    """Names of the arms a comparison of `test` has, in registry order (the imitator first)."""
    return tuple(name for name, arm in ARMS.items() if test in arm.tests)


def arm_label(name: str, scratch: bool = False) -> str:
    arm = ARMS[name]
    return arm.scratch_label if scratch and arm.scratch_label else arm.label
