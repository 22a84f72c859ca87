"""The text environments: the toy `rooms` game (rules, scripted expert, determinism, never raising on what a
model writes), the registry, and the ALFWorld adapter's mapping (ALFWorld itself is not installed here)."""

from __future__ import annotations

import copy
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.envs import ENVIRONMENTS, Environment, make_env
from services.worker.envs.alfworld import AlfworldUnavailable, clean_observation, find_games, to_step_result
from services.worker.envs.rooms import EXPERT_MAX_STEPS, UNKNOWN, RoomsEnv, parse_action


def _play_expert(env: RoomsEnv, limit: int) -> list:
    results = []
    while len(results) < limit:
        results.append(env.step(env.expert_action()))
        if results[-1].done:
            break
    return results


def test_expert_reaches_the_goal_on_many_seeds():
    env = RoomsEnv()
    lengths = set()
    for seed in range(1000):
        env.reset(seed)
        results = _play_expert(env, EXPERT_MAX_STEPS)
        assert results[-1].done and results[-1].success, f"seed {seed}: {results}"
        assert results[-1].reward == 1.0 and all(r.reward == 0.0 and not r.done for r in results[:-1])
        lengths.add(len(results))
    assert lengths == {4, 5, 6}  # go, take, go, put; a closed receptacle on the way adds an open


@pytest.mark.parametrize(
    "kw", [dict(num_receptacles=9, num_objects=10, p_closed=1.0), dict(num_receptacles=2)]
)
def test_expert_on_other_game_sizes(kw):
    env = RoomsEnv(**kw)
    for seed in range(200):
        env.reset(seed)
        assert _play_expert(env, EXPERT_MAX_STEPS)[-1].success


def test_expert_recovers_after_random_play():
    env = RoomsEnv()
    rng = random.Random(0)
    verbs = ["go to {r}", "open {r}", "close {r}", "take {o}", "put {o} in {r}", "look", "inventory"]
    for seed in range(300):
        env.reset(seed)
        s = env.state
        for _ in range(rng.randint(0, 8)):
            action = rng.choice(verbs).format(r=rng.choice(s.receptacles), o=rng.choice(s.objects))
            if env.step(action).done:
                break
        if s.done:
            continue
        # from anywhere: at most drop (go, open, put) + the 6-step plan
        assert _play_expert(env, EXPERT_MAX_STEPS + 3)[-1].success, f"seed {seed}"


def test_reset_is_deterministic_by_seed():
    a, b = RoomsEnv(), RoomsEnv()
    firsts = set()
    for seed in range(100):
        assert a.reset(seed) == b.reset(seed)
        assert [r.observation for r in _play_expert(a, 6)] == [r.observation for r in _play_expert(b, 6)]
        firsts.add(a.reset(seed))
    assert len(firsts) > 90  # different seeds, different games
    # a reset starts over: same seed again after play gives the same first observation and state
    a.reset(7)
    state = copy.deepcopy(a.state)
    a.step("go to " + a.state.receptacles[0])
    a.reset(7)
    assert a.state == state


def test_first_observation_states_goal_and_places():
    env = RoomsEnv()
    obs = env.reset(3)
    s = env.state
    assert obs.startswith(f"goal: put the {s.goal_object} ")
    assert f"the {s.goal_receptacle}." in obs.splitlines()[0]
    for o in s.objects:
        holder = next(r for r, items in s.contents.items() if o in items)
        assert f"{o}: {holder}" in obs
    assert len(obs) < 100  # short: the toy agents are character-level


def _game(closed: bool) -> RoomsEnv:
    """A fixed game: apple on the table, mug in the (open or closed) fridge, goal: apple in the fridge."""
    env = RoomsEnv()
    env.reset(0)
    s = env.state
    s.receptacles = ["table", "fridge", "sink"]
    s.contents = {"table": ["apple"], "fridge": ["mug"], "sink": []}
    s.closed = {"fridge"} if closed else set()
    s.objects = ["apple", "mug"]
    s.goal_object, s.goal_receptacle = "apple", "fridge"
    return env


ILLEGAL = [
    # (actions before, illegal action, what the observation says)
    ([], "go to moon", "there is no moon here."),
    ([], "open fridge", "you are not at the fridge."),
    ([], "take apple", "there is no apple here."),
    (["go to table"], "take mug", "there is no mug here."),
    (["go to fridge"], "take mug", "there is no mug here."),  # closed: its contents are out of reach
    (["go to table"], "open table", "the table cannot be opened."),
    (["go to table"], "close table", "the table cannot be closed."),
    (["go to fridge", "open fridge"], "open fridge", "the fridge is already open."),
    (["go to fridge"], "close fridge", "the fridge is already closed."),
    (["go to table"], "go to table", "you are already at the table."),
    (["go to table"], "take apple from fridge", "you are not at the fridge."),
    (["go to table", "take apple"], "take apple", "your hands are full: you have the apple."),
    (["go to table", "take apple"], "put apple in sink", "you are not at the sink."),
    (["go to table", "take apple", "go to fridge"], "put apple in fridge", "the fridge is closed."),
    ([], "put apple in fridge", "you do not have the apple."),
]


@pytest.mark.parametrize("before,action,says", ILLEGAL)
def test_illegal_actions_say_so_and_change_nothing(before, action, says):
    env = _game(closed=True)
    for a in before:
        r = env.step(a)
        assert not r.done and "no " not in r.observation[:9], (a, r)
    state = copy.deepcopy(env.state)
    r = env.step(action)
    assert (r.observation, r.reward, r.done, r.success) == (says, 0.0, False, False)
    state.steps += 1
    assert env.state == state


@pytest.mark.parametrize(
    "action", ["", "   ", "dance", "go to", "put apple", "take", "open the", "ßß∂ƒ", "x" * 10_000, "\n</s>"]
)
def test_malformed_actions_say_so(action):
    env = _game(closed=False)
    state = copy.deepcopy(env.state)
    r = env.step(action)
    assert r.observation == UNKNOWN and not r.done and r.reward == 0.0
    state.steps += 1
    assert env.state == state


def test_a_legal_game_and_its_observations():
    env = _game(closed=True)
    script = [
        ("look", "you are in the middle of the room."),
        ("inventory", "you have nothing."),
        ("go to fridge", "the fridge is closed."),
        ("open fridge", "you open the fridge. in the fridge: mug."),
        ("go to table", "on the table: apple."),
        ("take apple from table", "you take the apple."),
        ("look", "the table is empty."),
        ("inventory", "you have the apple."),
        ("Go to the Fridge.", "in the fridge: mug."),
        ("put apple in fridge", "you put the apple in the fridge."),
    ]
    for action, says in script:
        r = env.step(action)
        assert r.observation == says
    assert (r.reward, r.done, r.success) == (1.0, True, True)
    after = env.step("look")
    assert (after.observation, after.reward, after.done, after.success) == (
        "the episode is over.",
        0.0,
        True,
        True,
    )


def test_putting_elsewhere_is_not_success():
    env = _game(closed=False)
    for a in ("go to table", "take apple", "go to sink"):
        env.step(a)
    r = env.step("put apple in sink")
    assert r.observation == "you put the apple in the sink." and not r.done and r.reward == 0.0


def test_parse_action_normalises():
    assert parse_action("Go to the Fridge.") == ("go", "fridge")
    assert parse_action("  take   an apple from the table ") == ("take", "apple", "table")
    assert parse_action("put apple on table") == ("put", "apple", "table")
    assert parse_action("inventory") == ("inventory",)
    assert parse_action("eat apple") is None
    assert parse_action(None) is None


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), actions=st.lists(st.text(max_size=30), max_size=8))
def test_any_text_gives_an_observation(seed, actions):
    env = RoomsEnv()
    env.reset(seed)
    for a in actions:
        r = env.step(a)
        assert isinstance(r.observation, str) and r.observation
        assert r.reward in (0.0, 1.0)


def test_step_before_reset_is_a_programming_error():
    with pytest.raises(RuntimeError, match="reset"):
        RoomsEnv().step("look")


def test_options_are_validated():
    with pytest.raises(ValueError, match="num_receptacles"):
        RoomsEnv(num_receptacles=1)
    with pytest.raises(ValueError, match="num_objects"):
        RoomsEnv(num_objects=0)
    with pytest.raises(ValueError, match="p_closed"):
        RoomsEnv(p_closed=1.5)


def test_registry():
    assert set(ENVIRONMENTS) == {"rooms", "alfworld"}
    env = make_env("rooms", num_receptacles=3)
    assert isinstance(env, Environment) and env.num_receptacles == 3
    env.reset(0)
    assert len(env.state.receptacles) == 3
    with pytest.raises(ValueError, match=r"unknown environment 'chess'.*alfworld.*rooms"):
        make_env("chess")


def test_alfworld_without_the_package_names_what_to_install():
    try:
        import alfworld  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("alfworld is installed here")
    with pytest.raises(AlfworldUnavailable, match=r"pip install alfworld.*ALFWORLD_DATA"):
        make_env("alfworld")


def test_alfworld_mapping():
    text = "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room.\n\nYour task is to: put a mug in fridge."
    assert (
        clean_observation(text) == "You are in the middle of a room.\n\nYour task is to: put a mug in fridge."
    )
    r = to_step_result("Nothing happens.", False, {"won": False})
    assert (r.observation, r.reward, r.done, r.success) == ("Nothing happens.", 0.0, False, False)
    r = to_step_result("You put the mug 1 in/on the fridge 1.", False, {"won": [True]})  # batched infos
    assert (r.reward, r.done, r.success) == (1.0, True, True)
    r = to_step_result("You are facing the sink.", True, {"won": False})  # the game's step limit
    assert (r.reward, r.done, r.success) == (0.0, True, False)


def test_alfworld_finds_games_by_split_and_task_type(tmp_path):
    root = tmp_path / "json_2.1.1" / "train"
    for task in ("pick_and_place_simple-Mug-None-Fridge-1", "pick_heat_then_place_in_recep-Egg-None-Sink-2"):
        for trial in ("trial_a", "trial_b"):
            (root / task / trial).mkdir(parents=True)
            (root / task / trial / "game.tw-pddl").write_text("{}")
    games = find_games(tmp_path, "train")
    assert len(games) == 4 and games == sorted(games)
    simple = find_games(tmp_path, "train", ("pick_and_place",))
    assert len(simple) == 2 and all("pick_and_place_simple" in g for g in simple)
    with pytest.raises(AlfworldUnavailable, match="alfworld-download"):
        find_games(tmp_path, "valid_seen")
    with pytest.raises(ValueError, match="split"):
        find_games(tmp_path, "test")
