import pytest

from pipeline.config import PRESETS_DIR, SMOKE_BUDGET, ConfigError, load_preset
from pipeline.plan import task_id, teacher_id, teacher_specs

SHIPPED = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_presets_are_shipped():
    assert {"smoke", "quick"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("smoke", [False, True])
def test_every_shipped_preset_loads(name, smoke):
    preset = load_preset(name, smoke=smoke)
    specs = teacher_specs(preset)
    assert specs and len({s.teacher_id for s in specs}) == len(specs)
    if smoke:
        assert all(s.budget <= SMOKE_BUDGET for s in specs) and preset.name.endswith("-smoke")


def test_quick_has_a_heldout_split_of_darkroom_goals():
    group = load_preset("quick").collect.teachers["darkroom"]
    train = {tuple(t["goal"]) for t in group.tasks}
    heldout = {tuple(t["goal"]) for t in group.heldout_tasks}
    assert len(train) >= 64 and heldout and not train & heldout
    assert len(train | heldout) == 81


def test_ids():
    assert task_id({"goal": [2, 7]}) == "goal2x7" and task_id({}) == "default"
    assert teacher_id("darkroom", {"goal": [2, 7]}, 1) == "darkroom-goal2x7-s1"
    assert teacher_id("cartpole", {}, 0) == "cartpole-s0"


def test_overrides_apply_and_are_validated():
    preset = load_preset("smoke", ["collect.teachers.darkroom.budget=800", "collect.cutoffs=[0.5]"])
    assert preset.collect.teachers["darkroom"].budget == 800 and preset.collect.cutoffs == [0.5]
    with pytest.raises(ConfigError, match=r"collect.teachers.darkroom.budget: .*integer.*got 'lots'"):
        load_preset("smoke", ["collect.teachers.darkroom.budget=lots"])
    with pytest.raises(ConfigError, match=r"expects key.path=value"):
        load_preset("smoke", ["collect.shard_steps"])


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


GOOD = """
collect:
  teachers:
    dr:
      env: DarkRoom-v0
      algo: qlearning
      budget: 1000
"""


def test_a_minimal_preset_file_loads_with_defaults(tmp_path):
    preset = load_preset(write(tmp_path, GOOD))
    assert preset.name == "p" and preset.collect.cutoffs == [0.25, 0.5, 0.75]


@pytest.mark.parametrize("change, message", [
    (("budget: 1000", "budget: 1000\n      budgt: 5"), r"collect.teachers.dr.budgt: unknown key"),
    (("collect:", "colect: {}\ncollect:"), r"colect: unknown key"),
    (("budget: 1000", "budget: -3"), r"collect.teachers.dr.budget: .*greater than 0"),
    (("DarkRoom-v0", "DarkRom-v0"), r"collect.teachers.dr.env: unknown Gymnasium env id 'DarkRom-v0' \(did you mean 'DarkRoom-v0'\?\)"),
    (("algo: qlearning", "algo: sarsa"), r"collect.teachers.dr.algo: unknown algorithm 'sarsa'"),
    (("budget: 1000", "budget: 1000\n      algo_config: {learning_rat: 0.5}"), r"collect.teachers.dr.algo_config.learning_rat: unknown key"),
    (("budget: 1000", "budget: 1000\n      algo_config: {gamma: 2}"), r"collect.teachers.dr.algo_config.gamma: .*less than or equal to 1"),
    (("budget: 1000", "budget: 1000\n      tasks: [{goal: [0, 0]}, {goal: [12, 0]}]"), r"collect.teachers.dr.tasks.1: DarkRoom-v0 rejects .*outside the 9x9 room"),
    (("budget: 1000", "budget: 1000\n      env_kwargs: {colour: red}"), r"collect.teachers.dr: tasks.0: DarkRoom-v0 rejects|collect.teachers.dr.tasks.0: DarkRoom-v0 rejects .*colour"),
    (("DarkRoom-v0", "CartPole-v1"), r"collect.teachers.dr.tasks.0: qlearning needs discrete observations"),
    (("budget: 1000", "budget: 2"), r"collect.teachers.dr.budget: 2 steps is too small"),
    (("collect:", "collect:\n  cutoffs: [0.5, 0.25]"), r"collect.cutoffs: expected increasing fractions"),
    (("budget: 1000", "budget: 1000\n      seeds: [1, 1]"), r"teacher id dr-s1 is not unique"),
])
def test_bad_presets_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_preset(write(tmp_path, GOOD.replace(*change)))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown preset .nope. \(looked in .*\); known presets: .*quick.*smoke"):
        load_preset("nope")


def test_stops_put_checkpoints_at_cutoffs_and_commits_where_asked():
    spec = teacher_specs(load_preset("smoke", ["collect.teachers.darkroom.budget=1000", "collect.cutoffs=[0.25, 0.5]"]))[0]
    stops = spec.stops(shard_steps=400, checkpoint_steps=None)
    assert [(s.step, s.cutoff, s.ends_shard, s.commits) for s in stops] == [
        (250, 0.25, False, False), (400, None, True, False), (500, 0.5, False, False),
        (800, None, True, False), (1000, 1.0, True, True)]
    assert [s.step for s in spec.stops(shard_steps=10_000, checkpoint_steps=300) if s.commits] == [300, 600, 900, 1000]


RLLIB = """
collect:
  teachers:
    pong:
      env: ALE/Breakout-v5
      algo: dqn
      budget: 6400
      env_kwargs: {full_action_space: true}
      heldout_envs: [ALE/SpaceInvaders-v5]
"""


def test_an_atari_dqn_group_with_a_transfer_target_loads(tmp_path):
    group = load_preset(write(tmp_path, RLLIB)).collect.teachers["pong"]
    assert group.heldout_envs == ["ALE/SpaceInvaders-v5"]


@pytest.mark.parametrize("change, message", [
    (("budget: 6400", "budget: 6401"), r"pong.budget: 6401 is not a whole number of dqn training iterations of 64 env steps"),
    (("algo: dqn", "algo: ppo"), r"pong.tasks.0: ppo teachers here need vector or discrete observations \(use dqn for images\)"),
    (("budget: 6400", "budget: 6400\n      algo_config: {replay_ratio: 1.5}"), r"1.5 updates per iteration; choose values"),
    (("env_kwargs: {full_action_space: true}", "env_kwargs: {}"), r"pong.heldout_envs.0: ALE/SpaceInvaders-v5 has actions Discrete\(6\), "
     r"ALE/Breakout-v5 has Discrete\(4\).*full_action_space: true"),
    (("[ALE/SpaceInvaders-v5]", "[ALE/SpaceInvader-v5]"), r"pong.heldout_envs.0: unknown Gymnasium env id 'ALE/SpaceInvader-v5' \(did you mean 'ALE/SpaceInvaders-v5'\?\)"),
])
def test_bad_rllib_groups_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_preset(write(tmp_path, RLLIB.replace(*change)))


def test_smoke_keeps_whole_training_iterations():
    breakout = load_preset("atari", smoke=True).collect.teachers["breakout"]
    assert breakout.budget % 100 == 0 and breakout.budget <= 1000 and breakout.algo == "dqn"


def test_resources_per_stage_come_from_the_preset_and_smoke_drops_them():
    preset = load_preset("atari")
    assert preset.collect.actor.ray_options() == {"num_cpus": 1, "num_gpus": 0, "memory": 32 * 2**30, "resources": None}
    assert preset.evaluate.trial_resources["imitator"].tune_resources() == {"cpu": 1, "gpu": 0.25}
    assert preset.train.use_gpu is True
    smoke = load_preset("atari", smoke=True)
    assert smoke.collect.actor.ray_options()["memory"] is None and smoke.evaluate.trial_resources == {}
    assert load_preset("quick", ["train.use_gpu=auto"]).train.use_gpu == "auto"
    with pytest.raises(ConfigError, match="trial_resources"):
        load_preset("quick", ["evaluate.trial_resources={learner: {cpus: 1}}"])


@pytest.mark.parametrize("algo, streams, message", [
    ("ppo", "num_envs: 2", r"darkroom.algo_config.num_envs: several envs per learner are recorded by lean_ppo only, not ppo"),
    ("lean_ppo", "num_envs: 3, train_batch_size: 200", r"darkroom.algo_config.*train_batch_size 200 is not a multiple of num_envs 3"),
])
def test_several_envs_per_learner_only_where_recorded(algo, streams, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("smoke", [f"collect.teachers.darkroom.algo={algo}", f"collect.teachers.darkroom.algo_config={{{streams}}}"])


@pytest.mark.parametrize("override, message", [
    ("evaluate.verdict={margin: 2}", r"evaluate.verdict: .*margin must be in \(0, 1\], not 2"),
    ("evaluate.verdict={marg: 0.2}", r"evaluate.verdict.marg: unknown key"),
])
def test_bad_verdict_thresholds_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("quick", [override])
    assert load_preset("quick", ["evaluate.verdict={margin: 0.1}"]).evaluate.verdict.margin == 0.1
