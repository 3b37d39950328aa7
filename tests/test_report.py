"""The report stage on synthetic evaluation results whose verdicts are known by construction.

CartPole-v1: the imitator plateaus at the return it saw last before the cutoff (L_c) while the
continued teacher keeps improving (-> "does not"); at cutoff 0.25 one imitator trial failed
(-> "missing: seeds [2]"). DarkRoom-v0: the imitator climbs well above the best it saw before the
cutoff (-> "extrapolates"), and on held-out goals (positive control) it improves in context
(-> "learns in context").

(The imitators start from L_c, the mean of the teacher's last W pre-cutoff episodes, not from the
frozen snapshot's level: on a teacher curve this steep the snapshot itself plays above B_c, because
a W-episode mean lags a rising curve.)
"""

import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from pipeline.metrics import (B_C, CEILING_EXCEEDANCE, COUNT, CUTOFF, DOES_NOT, ENV, ENV_STEPS, EPISODIC_RETURN, IN_DATA_RATIO,
                              EXTRAPOLATES, FINAL_IMITATOR, FINAL_TEACHER, FIRST_IMITATOR, L_C, MISSING_SEEDS, N_SEEDS,
                              PER_SEED_METRICS, SEED, TRANSFER_AUC_RATIO, TRIAL_FINISHED, UNIT, VERDICT, Curve,
                              missing_status, per_seed_metrics, transfer_auc_ratio)
from pipeline.config import load_preset
from pipeline.errors import PipelineError
from pipeline.layout import grid_file, trial_result
from pipeline.plan import trial_batches, trial_specs
from pipeline.report.figures import mean_band, on_grid
from pipeline.report.stage import build_report, gather
from pipeline.report.tables import (CONTEXT_STEPS, CUTOFF_STEP, EPISODE_STEPS, FAILED, GROUP, HISTORY_COLUMNS,
                                    IN_CONTEXT_GAIN, LEARNS_IN_CONTEXT, MISSING, MISSING_TRIALS, OK, RETURN, STATUS,
                                    TEST, TRIAL_ID, ReportError)
from pipeline.store import Store

EPISODE = 20  # env steps per synthetic episode
BUDGET = 2000  # teacher budget: 100 episodes
HORIZON = 1000  # steps each arm runs after the cutoff: 50 episodes
SEEDS = range(5)
CARTPOLE, DARKROOM = ("CartPole-v1", "cartpole-dqn"), ("DarkRoom-v0", "darkroom-q")


def ends(n: int) -> np.ndarray:
    return EPISODE * np.arange(1, n + 1)


def teacher_return(env: str, seed: int, step: np.ndarray) -> np.ndarray:
    """The teachers' noiseless learning curves: CartPole 10 -> 500, DarkRoom 0 -> 10 over the budget."""
    top = 490.0 if env == CARTPOLE[0] else 10.0
    return (10.0 if env == CARTPOLE[0] else 0.0) + top * step / BUDGET + 0.02 * top * seed


def seen_level(env: str, seed: int, cutoff: float) -> float:
    """Noiseless L_c: the mean return of the teacher's last 10 episodes before the cutoff."""
    return float(teacher_return(env, seed, cutoff * BUDGET - EPISODE * np.arange(10)).mean())


class World:
    """Expected trials, their episodes and the teachers' histories, built up row by row."""

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.trials, self.episodes, self.histories = [], [], []

    def noise(self, env: str, n: int) -> np.ndarray:
        return self.rng.normal(0.0, 3.0 if env == CARTPOLE[0] else 0.2, n)

    def trial(self, test, env, group, cutoff, seed, arm, returns, status="ok", size="", context="", context_steps=0,
              task_id="default", horizon=HORIZON, prime_step=None):
        trial_id = f"{test}/{env}/{cutoff}/{arm}/{context_steps}/{seed}"
        self.trials.append(dict(trial_id=trial_id, test=test, env=env, group=group, cutoff=cutoff, seed=seed,
                                task_id=task_id, arm=arm, context=context, context_steps=context_steps, size=size,
                                horizon=horizon, status=status, prime_step=prime_step))
        self.episodes += [dict(trial_id=trial_id, env_steps=step, episodic_return=r)
                          for step, r in zip(ends(len(returns)), returns)]

    def history(self, env, group, seed):
        step = ends(BUDGET // EPISODE)
        returns = teacher_return(env, seed, step) + self.noise(env, len(step))
        self.histories += [dict(group=group, env=env, seed=seed, task_id="default", end_step=s, episodic_return=r,
                                budget=BUDGET) for s, r in zip(step, returns)]

    def extrapolation(self, env, group, cutoff, imitator_lift, contexts=(200,), failed_seed=None):
        """Arms after the cutoff: the teacher keeps its slope, the snapshot stays at the policy's level,
        and the imitator moves linearly from L_c to L_c + `imitator_lift`."""
        t = ends(HORIZON // EPISODE)
        for seed in SEEDS:
            level = teacher_return(env, seed, np.array(cutoff * BUDGET))
            self.trial("extrapolation", env, group, cutoff, seed, "teacher",
                       teacher_return(env, seed, cutoff * BUDGET + t) + self.noise(env, len(t)))
            self.trial("extrapolation", env, group, cutoff, seed, "snapshot", level + self.noise(env, len(t)))
            self.trial("extrapolation", env, group, cutoff, seed, "random", 0.04 * level + self.noise(env, len(t)))
            for context_steps in contexts:
                status = "failed" if seed == failed_seed else "ok"
                returns = seen_level(env, seed, cutoff) + imitator_lift * t / HORIZON + self.noise(env, len(t))
                returns = returns if status == "ok" else returns[:5]  # a failed trial's few episodes must not count
                self.trial("extrapolation", env, group, cutoff, seed, "imitator", returns, status=status, size="small",
                           context="primed", context_steps=context_steps)
                self.in_data(env, group, cutoff, seed, context_steps)

    def in_data(self, env, group, cutoff, seed, context_steps):
        """The in-data control: primed at c' = c / 4, it climbs as the teacher did from L_c' to L_c."""
        prime, cut = round(cutoff * BUDGET / 4), round(cutoff * BUDGET)
        t = ends((cut - prime) // EPISODE)
        start, end = seen_level(env, seed, prime / BUDGET), seen_level(env, seed, cutoff)
        self.trial("extrapolation", env, group, cutoff, seed, "in_data", start + (end - start) * t / t[-1] + self.noise(env, len(t)),
                   size="small", context="primed", context_steps=context_steps, horizon=cut - prime, prime_step=prime)

    def control(self, env, group):
        """Held-out goals: the imitator climbs 1 -> 9 in context, the scratch teacher 0 -> 4."""
        t = ends(HORIZON // EPISODE)
        for task in SEEDS:
            options = dict(task_id=f"goal-{task}")
            self.trial("control", env, group, 1.0, task, "imitator", 1 + 8 * t / HORIZON + self.noise(env, len(t)),
                       size="small", context="empty", context_steps=400, **options)
            self.trial("control", env, group, 1.0, task, "teacher", 4 * t / HORIZON + self.noise(env, len(t)),
                       **options)
            self.trial("control", env, group, 1.0, task, "random", 0.5 + self.noise(env, len(t)), **options)

    def frames(self):
        return pd.DataFrame(self.trials), pd.DataFrame(self.episodes), pd.DataFrame(self.histories)


def make_world() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    world = World()
    for seed in SEEDS:
        world.history(*CARTPOLE, seed)
        world.history(*DARKROOM, seed)
    world.extrapolation(*CARTPOLE, 0.5, imitator_lift=-5.0, contexts=(200, 400))  # plateaus at L_c
    world.extrapolation(*CARTPOLE, 0.25, imitator_lift=0.0, failed_seed=2)
    world.extrapolation(*DARKROOM, 0.5, imitator_lift=5.0)  # climbs 5 above the level it was cut at
    world.control(*DARKROOM)
    return world.frames()


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def report(world, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report")
    return build_report(*world, str(out_dir))


def table_after(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first table under `## heading`, as {column: cell}."""
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def summary_row(report, test: str, env: str, cutoff: float, context_steps: int | None = None) -> pd.Series:
    table = report.table
    rows = table[(table[TEST] == test) & (table[ENV] == env) & (table[CUTOFF] == cutoff)]
    if context_steps is not None:
        rows = rows[rows[CONTEXT_STEPS] == context_steps]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def episodes_curve(episodes: pd.DataFrame, trial_id: str) -> Curve:
    rows = episodes[episodes.trial_id == trial_id]
    return Curve(rows.env_steps.to_numpy(), rows.episodic_return.to_numpy())


# --- report.md -----------------------------------------------------------------------------------


def test_report_md_has_the_expected_verdict_per_env(report):
    markdown = read(report.path_md)
    rows = table_after(markdown, "Extrapolation test")
    verdicts = {(r["env"], r["cutoff"], r["variant"]): r["verdict"].split("**")[1] for r in rows}
    reasons = {(r["env"], r["cutoff"]): r["verdict"] for r in rows if r["variant"] == "small, 400 steps primed"}
    assert "is below 0.25; fidelity" in reasons[("CartPole-v1", "0.5")] and "**degrades**" in reasons[("CartPole-v1", "0.5")]
    assert verdicts == {
        ("CartPole-v1", "0.25", "small, 200 steps primed"): missing_status([2]),
        ("CartPole-v1", "0.5", "small, 200 steps primed"): DOES_NOT,
        ("CartPole-v1", "0.5", "small, 400 steps primed"): DOES_NOT,
        ("DarkRoom-v0", "0.5", "small, 200 steps primed"): EXTRAPOLATES,
    }
    control = table_after(markdown, "Positive control")
    assert [(r["env"], r["verdict"].strip("*")) for r in control] == [("DarkRoom-v0", LEARNS_IN_CONTEXT)]
    assert "No transfer trials in this run." in markdown
    assert "## How to read this" in markdown


def test_failed_trial_is_missing_not_averaged_over_fewer_seeds(report):
    row = summary_row(report, "extrapolation", "CartPole-v1", 0.25)
    assert row[VERDICT] == missing_status([2]) and list(row[MISSING_SEEDS]) == [2]
    assert row[MISSING_TRIALS] == "imitator failed: seeds [2]"
    assert row[N_SEEDS] == 5 and row[FINAL_IMITATOR + COUNT] == 4  # the failed trial's 5 episodes are not used
    markdown_row = next(r for r in table_after(read(report.path_md), "Extrapolation test") if r["cutoff"] == "0.25")
    assert markdown_row["complete seeds"] == "4/5"
    assert markdown_row["missing trials"] == "imitator failed: seeds [2]"
    assert "(4/5 seeds)" in markdown_row["imitator final"] and "(4/5 seeds)" in markdown_row["extrapolation ratio"]
    assert "missing: seeds [2]" in report.paragraph


def test_summary_paragraph_mentions_every_env_and_verdict(report):
    paragraph = report.paragraph
    assert "CartPole-v1 (cartpole-dqn) cutoff 0.5, 2 imitator variants: small, 200 steps primed: does not extrapolate (" in paragraph
    assert "; small, 400 steps primed: does not extrapolate (extrapolation ratio" in paragraph  # each variant its own
    assert "DarkRoom-v0 (darkroom-q) cutoff 0.5: extrapolates (imitator final - de-biased B_c" in paragraph
    assert "Positive control on DarkRoom-v0 held-out tasks (darkroom-q): learns in context" in paragraph
    assert "\n" not in paragraph and paragraph in read(report.path_md)


# --- metrics.parquet / summary.parquet -----------------------------------------------------------


def test_metrics_parquet_round_trips_and_matches_metrics_functions(report, world):
    trials, episodes, histories = world
    per_seed = pd.read_parquet(report.path_metrics)
    assert {TEST, ENV, GROUP, CUTOFF, SEED, CUTOFF_STEP, IN_CONTEXT_GAIN, *PER_SEED_METRICS} <= set(per_seed.columns)
    assert len(per_seed) == 5 * (2 + 1 + 1 + 1)  # seeds x (CartPole 0.5: 2 variants, 0.25, DarkRoom, control)

    row = per_seed[(per_seed[ENV] == "CartPole-v1") & (per_seed[CUTOFF] == 0.5) & (per_seed[CONTEXT_STEPS] == 400)
                   & (per_seed[SEED] == 3)].iloc[0]
    assert row[CUTOFF_STEP] == 1000
    teacher_rows = histories[(histories.env == "CartPole-v1") & (histories.seed == 3)]
    history = Curve(teacher_rows.end_step.to_numpy(), teacher_rows.episodic_return.to_numpy())
    arm = {a: episodes_curve(episodes, f"extrapolation/CartPole-v1/0.5/{a}/{400 if a in ('imitator', 'in_data') else 0}/3")
           for a in ("teacher", "imitator", "snapshot", "random", "in_data")}
    expected = per_seed_metrics(history, arm["teacher"], arm["imitator"], arm["snapshot"], cutoff_step=1000,
                                horizon_steps=HORIZON, random=arm["random"], in_data=arm["in_data"], prime_step=250)
    assert 0.8 < row[IN_DATA_RATIO] < 1  # it climbed as the teacher did from c' to c
    for metric, value in expected.items():
        assert row[metric] == pytest.approx(value), metric

    control = per_seed[(per_seed[TEST] == "control") & (per_seed[SEED] == 1)].iloc[0]
    imitator = episodes_curve(episodes, "control/DarkRoom-v0/1.0/imitator/400/1")
    scratch = episodes_curve(episodes, "control/DarkRoom-v0/1.0/teacher/0/1")
    assert control[TRANSFER_AUC_RATIO] == pytest.approx(transfer_auc_ratio(imitator, scratch, HORIZON))
    assert control[TRANSFER_AUC_RATIO] > 1.5  # the imitator's 1 -> 9 against the teacher's 0 -> 4
    assert np.isnan(control[L_C]) and pd.isna(control[CUTOFF_STEP])


def test_summary_parquet_agrees_with_the_per_seed_rows(report):
    summary = pd.read_parquet(report.path_summary)
    assert len(summary) == len(report.table) == 5
    per_seed = pd.read_parquet(report.path_metrics)
    darkroom = per_seed[(per_seed[TEST] == "extrapolation") & (per_seed[ENV] == "DarkRoom-v0")]
    row = summary_row(report, "extrapolation", "DarkRoom-v0", 0.5)
    assert row[FINAL_IMITATOR] == pytest.approx(darkroom[FINAL_IMITATOR].mean())
    assert row[CEILING_EXCEEDANCE + "_low"] > 0  # the reason for "extrapolates"
    cartpole = summary_row(report, "extrapolation", "CartPole-v1", 0.5, context_steps=200)
    assert cartpole[FINAL_IMITATOR + "_high"] < cartpole[FINAL_TEACHER + "_low"]
    assert cartpole[FINAL_IMITATOR] < cartpole[B_C]
    control = summary_row(report, "control", "DarkRoom-v0", 1.0)
    assert control[IN_CONTEXT_GAIN + "_low"] > 0 and control[FINAL_IMITATOR] > control[FIRST_IMITATOR]
    assert list(summary[VERDICT]) == list(report.table[VERDICT])


# --- figures -------------------------------------------------------------------------------------


def test_figures_are_readable_non_blank_pngs(report):
    names = sorted(path.rsplit("/", 1)[1] for path in report.figures)
    assert names == ["context_CartPole-v1_cartpole-dqn_cutoff0.5.png", "control_DarkRoom-v0_darkroom-q_cutoff1.png",
                     "curves_CartPole-v1_cartpole-dqn_cutoff0.25.png", "curves_CartPole-v1_cartpole-dqn_cutoff0.5.png",
                     "curves_DarkRoom-v0_darkroom-q_cutoff0.5.png"]
    markdown = read(report.path_md)
    for path in report.figures:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        pixels = imread(path)
        height, width = pixels.shape[:2]
        assert height >= 500 and width >= 800, (path, pixels.shape)  # 8x5 in at 120 dpi: 960x600
        assert pixels[..., :3].std() > 0.05, path
        assert f"]({path.rsplit('/', 1)[1]})" in markdown


# --- pieces --------------------------------------------------------------------------------------


def test_on_grid_carries_the_last_rolling_return_forward():
    curve = Curve(np.array([10, 20, 30]), np.array([2.0, 4.0, 9.0]))
    values = on_grid(curve, np.array([0, 9, 10, 25, 30, 100]), window=2)
    np.testing.assert_array_equal(values, [np.nan, np.nan, 2.0, 3.0, 6.5, 6.5])
    assert np.isnan(on_grid(None, np.arange(3), 2)).all()


def test_mean_band_contains_the_mean_and_collapses_for_identical_seeds():
    values = np.array([[1.0, 2.0, np.nan], [3.0, 6.0, 5.0], [2.0, 4.0, 7.0]])
    mean, low, high = mean_band(values)
    np.testing.assert_allclose(mean, [2.0, 4.0, 6.0])
    assert np.all(low <= mean) and np.all(mean <= high) and np.all(high - low > 0)
    assert high[0] - mean[0] == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-3)  # the t-interval of 1, 3, 2
    assert high[2] - mean[2] == pytest.approx(12.706 * np.std([5.0, 7.0], ddof=1) / np.sqrt(2), rel=1e-3)  # 2 seeds there
    _, low, high = mean_band(np.tile([[1.0, 5.0]], (4, 1)))
    np.testing.assert_allclose(low, high)
    _, low, _ = mean_band(np.array([[1.0, 2.0]]))  # one seed: no band
    assert np.isnan(low).all()


@pytest.mark.parametrize("damage, culprit", [
    (lambda t: t.drop(columns="horizon"), "lacks columns ['horizon']"),
    (lambda t: t.assign(status="crashed"), "trials.status has ['crashed']"),
    (lambda t: t.assign(arm=t.arm.replace("snapshot", "snap")), "trials.arm has ['snap']"),
    (lambda t: pd.concat([t, t.iloc[:1].assign(trial_id="again")]), "more than one trial per arm and seed: ["),
    (lambda t: t.assign(seed=t.seed.astype(object).where(t.seed != 3, "three")), "trials.seed has a value that is not"),
    (lambda t: t[t.arm != "imitator"], "no imitator trials to report on"),
])
def test_malformed_trials_are_refused_with_the_culprit_named(world, tmp_path, damage, culprit):
    trials, episodes, histories = world
    with pytest.raises(ReportError) as caught:
        build_report(damage(trials), episodes, histories, str(tmp_path))
    message = str(caught.value)
    assert culprit in message and "\n" not in message, message
    assert isinstance(caught.value, PipelineError) and caught.value.exit_status == 1
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize("line", [b'{"training_iteration": 1, "env_st', b"[1, 2]"])
def test_a_damaged_result_json_is_refused_naming_the_file(tmp_path, line):
    preset = load_preset("smoke")
    trial = trial_specs(preset)[1]
    store = Store(str(tmp_path))
    path = trial_result("exp", trial.trial_id)
    store.write_bytes(path, b'{"training_iteration": 1, "env_steps": 20, "episodic_return": 1.0}\n' + line + b"\n")
    with pytest.raises(ReportError) as caught:
        gather(preset, store, "exp")
    message = str(caught.value)
    assert f"{store.url(path)} line 2 is damaged" in message and trial.trial_id in message, message
    assert "\n" not in message


def write_results(store, batch_id: str, rows: list[dict]) -> None:
    numbered = [{"training_iteration": i, **row} for i, row in enumerate(rows, start=1)]
    store.write_bytes(trial_result("exp", batch_id), b"".join(json.dumps(r).encode() + b"\n" for r in numbered))


def episode(unit: str, steps: int, value: float) -> dict:
    return {UNIT: unit, ENV_STEPS: steps, EPISODIC_RETURN: value}


def test_a_batch_gives_its_status_to_each_unit_and_each_unit_its_own_episodes(tmp_path):
    # The positive control only (no teacher histories to read): 3 held-out runs per arm, in trials of 2 and 1.
    preset = load_preset("smoke", ["train.imitators.darkroom.cutoffs=[1.0]", "evaluate.lockstep=2",
                                   "evaluate.imitators.darkroom.heldout_seeds=[0,1,2]"])
    finished, crashed = (next(b for b in trial_batches(trial_specs(preset), 2) if b.arm == arm and len(b.units) == 2)
                         for arm in ("imitator", "random"))
    store = Store(str(tmp_path))
    first, second = (u.trial_id for u in finished.units)
    write_results(store, finished.batch_id, [episode(first, 10, 1.0), episode(second, 10, 2.0), episode(first, 20, 3.0),
                                             {ENV_STEPS: 100, TRIAL_FINISHED: True}])
    write_results(store, crashed.batch_id, [episode(u.trial_id, 10, 0.0) for u in crashed.units])
    trials, episodes, _ = gather(preset, store, "exp")
    status = dict(zip(trials[TRIAL_ID], trials[STATUS]))
    assert {status[u.trial_id] for u in finished.units} == {OK} and {status[u.trial_id] for u in crashed.units} == {FAILED}
    assert set(status.values()) == {OK, FAILED, MISSING}  # units of trials that never ran are missing
    mine = lambda unit: list(zip(*[episodes[episodes[TRIAL_ID] == unit][c] for c in (EPISODE_STEPS, RETURN)]))  # noqa: E731
    assert mine(first) == [(10, 1.0), (20, 3.0)] and mine(second) == [(10, 2.0)]


def test_a_grid_from_before_lockstep_is_read_as_one_trial_per_unit(tmp_path):
    preset = load_preset("smoke", ["train.imitators.darkroom.cutoffs=[1.0]"])
    units = trial_specs(preset)
    store = Store(str(tmp_path))
    store.write_bytes(grid_file("exp"), json.dumps([asdict(u) for u in units]).encode())
    write_results(store, units[0].trial_id, [{ENV_STEPS: 10, EPISODIC_RETURN: 1.0},
                                                  {ENV_STEPS: 100, TRIAL_FINISHED: True}])
    trials, episodes, _ = gather(preset, store, "exp")
    assert list(trials[STATUS]) == [OK] + [MISSING] * (len(units) - 1)
    assert list(episodes[TRIAL_ID]) == [units[0].trial_id]


def test_a_grid_with_only_the_positive_control_reports_it(tmp_path):
    # No extrapolation test means no teacher histories to draw: the report still has the control.
    world = World()
    world.control(*DARKROOM)
    trials, episodes, _ = world.frames()
    summary = build_report(trials, episodes, pd.DataFrame(columns=list(HISTORY_COLUMNS)), str(tmp_path))
    rows = table_after(read(summary.path_md), "Positive control")
    assert [r["verdict"].strip("*") for r in rows] == [LEARNS_IN_CONTEXT]
