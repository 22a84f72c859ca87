"""`rooms`: ALFWorld's household tasks in miniature, a text game that runs anywhere with no data.

A room holds a few receptacles (table, fridge, drawer, ...), some of which open and close, and a few objects
lying in them. The goal is always "put the X in/on the Y". Everything is lowercase and short, because the
toy agents are character-level models with a context of a few hundred tokens:

    reset    goal: put the apple in the fridge.
             apple: drawer, mug: table.
    actions  go to drawer | open drawer | close drawer | take apple [from drawer] | put apple in fridge
             | look | inventory
    answers  the drawer is closed. | you open the drawer. in the drawer: apple. | you take the apple.
             | you put the apple in the fridge. | unknown action. | you are not at the fridge. | ...

Rules: one object in hand at a time; taking or putting needs the agent at that receptacle, opened if it
opens; the contents of a closed receptacle are not shown. Putting the goal object in the goal receptacle
ends the episode with reward 1.0 and success; every other step has reward 0.0. Illegal actions (wrong
place, closed receptacle, full hands, unknown names) and malformed ones get an observation saying so and
change nothing. The game never ends by itself: the episode runner's turn limit does that.

`expert_action()` is a scripted expert that reads the hidden state and reaches the goal in at most 6 steps
from any state reachable by legal play (go, open, take, go, open, put); it is the toy agent teacher's data.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from services.worker.envs.base import StepResult

OPENABLE = ("fridge", "drawer", "cabinet", "box")
SURFACES = ("table", "counter", "shelf", "sink", "desk")
OBJECTS = ("apple", "mug", "key", "book", "egg", "pen", "cup", "soap", "bread", "plate")
EXPERT_MAX_STEPS = 6

UNKNOWN = "unknown action."
_ARTICLES = re.compile(r"\b(the|a|an)\b")
_PATTERNS = (
    ("go", re.compile(r"(?:go to|goto) (\w+)")),
    ("open", re.compile(r"open (\w+)")),
    ("close", re.compile(r"close (\w+)")),
    ("take", re.compile(r"(?:take|pick up|get) (\w+)(?: from (\w+))?")),
    ("put", re.compile(r"put (\w+) (?:in|on|into|onto|in/on) (\w+)")),
    ("look", re.compile(r"look")),
    ("inventory", re.compile(r"inventory|inv|i")),
)


def preposition(receptacle: str) -> str:
    return "in" if receptacle in OPENABLE or receptacle == "sink" else "on"


def parse_action(text: str) -> tuple[str, ...] | None:
    """(verb, *names) of an action written as text, or None when it is not an action of the game.

    Case, surrounding spaces, a final period and articles are ignored: "Go to the Fridge." == "go to fridge".
    """
    if not isinstance(text, str):
        return None
    norm = " ".join(_ARTICLES.sub(" ", text.lower().strip().rstrip(".")).split())
    for verb, pattern in _PATTERNS:
        m = pattern.fullmatch(norm)
        if m:
            return (verb, *(g for g in m.groups() if g is not None))
    return None


@dataclass
class RoomsState:
    receptacles: list[str]
    closed: set[str]
    contents: dict[str, list[str]]  # receptacle -> objects in it, in placement order
    goal_object: str
    goal_receptacle: str
    at: str | None = None  # the receptacle the agent stands at (None: the middle of the room)
    holding: str | None = None
    done: bool = False
    success: bool = False
    steps: int = 0
    objects: list[str] = field(default_factory=list)


class RoomsEnv:
    """The toy household game; see the module docstring. Deterministic from the reset seed."""

    def __init__(self, num_receptacles: int = 4, num_objects: int = 2, p_closed: float = 0.7) -> None:
        if not 2 <= num_receptacles <= len(OPENABLE) + len(SURFACES):
            raise ValueError(
                f"num_receptacles: {num_receptacles} not in [2, {len(OPENABLE) + len(SURFACES)}]"
            )
        if not 1 <= num_objects <= len(OBJECTS):
            raise ValueError(f"num_objects: {num_objects} not in [1, {len(OBJECTS)}]")
        if not 0.0 <= p_closed <= 1.0:
            raise ValueError(f"p_closed: {p_closed} not in [0, 1]")
        self.num_receptacles = num_receptacles
        self.num_objects = num_objects
        self.p_closed = p_closed
        self.state: RoomsState | None = None

    # -- episode

    def reset(self, seed: int) -> str:
        rng = random.Random(f"rooms:{seed}")
        receptacles = rng.sample(OPENABLE + SURFACES, self.num_receptacles)
        closed = {r for r in receptacles if r in OPENABLE and rng.random() < self.p_closed}
        objects = rng.sample(OBJECTS, self.num_objects)
        contents: dict[str, list[str]] = {r: [] for r in receptacles}
        where = {}
        for o in objects:
            where[o] = rng.choice(receptacles)
            contents[where[o]].append(o)
        goal_object = objects[0]
        goal_receptacle = rng.choice([r for r in receptacles if r != where[goal_object]])
        self.state = RoomsState(receptacles, closed, contents, goal_object, goal_receptacle, objects=objects)
        placed = ", ".join(f"{o}: {where[o]}" for o in objects)
        return f"goal: put the {goal_object} {preposition(goal_receptacle)} the {goal_receptacle}.\n{placed}."

    def step(self, action: str) -> StepResult:
        s = self._require_state()
        if s.done:
            return StepResult("the episode is over.", 0.0, True, s.success)
        s.steps += 1
        parsed = parse_action(action)
        observation = UNKNOWN if parsed is None else getattr(self, f"_do_{parsed[0]}")(*parsed[1:])
        reward = 1.0 if s.success and s.done else 0.0
        return StepResult(observation, reward, s.done, s.success)

    # -- actions (each returns the observation; illegal ones change nothing)

    def _do_go(self, r: str) -> str:
        s = self._require_state()
        if r not in s.receptacles:
            return f"there is no {r} here."
        if s.at == r:
            return f"you are already at the {r}."
        s.at = r
        return self._view(r)

    def _do_open(self, r: str) -> str:
        s = self._require_state()
        why = self._not_reachable(r)
        if why:
            return why
        if r not in OPENABLE:
            return f"the {r} cannot be opened."
        if r not in s.closed:
            return f"the {r} is already open."
        s.closed.discard(r)
        return f"you open the {r}. {self._view(r)}"

    def _do_close(self, r: str) -> str:
        s = self._require_state()
        why = self._not_reachable(r)
        if why:
            return why
        if r not in OPENABLE:
            return f"the {r} cannot be closed."
        if r in s.closed:
            return f"the {r} is already closed."
        s.closed.add(r)
        return f"you close the {r}."

    def _do_take(self, o: str, r: str | None = None) -> str:
        s = self._require_state()
        if r is not None:
            why = self._not_reachable(r)
            if why:
                return why
        if s.holding is not None:
            return f"your hands are full: you have the {s.holding}."
        if s.at is None or s.at in s.closed or o not in s.contents[s.at]:
            return f"there is no {o} here."
        s.contents[s.at].remove(o)
        s.holding = o
        return f"you take the {o}."

    def _do_put(self, o: str, r: str) -> str:
        s = self._require_state()
        if s.holding != o:
            return f"you do not have the {o}."
        why = self._not_reachable(r)
        if why:
            return why
        if r in s.closed:
            return f"the {r} is closed."
        s.contents[r].append(o)
        s.holding = None
        if o == s.goal_object and r == s.goal_receptacle:
            s.done = s.success = True
        return f"you put the {o} {preposition(r)} the {r}."

    def _do_look(self) -> str:
        s = self._require_state()
        return "you are in the middle of the room." if s.at is None else self._view(s.at)

    def _do_inventory(self) -> str:
        s = self._require_state()
        return f"you have the {s.holding}." if s.holding else "you have nothing."

    # -- helpers

    def _view(self, r: str) -> str:
        s = self._require_state()
        if r in s.closed:
            return f"the {r} is closed."
        items = s.contents[r]
        return f"{preposition(r)} the {r}: {', '.join(items)}." if items else f"the {r} is empty."

    def _not_reachable(self, r: str) -> str | None:
        s = self._require_state()
        if r not in s.receptacles:
            return f"there is no {r} here."
        if s.at != r:
            return f"you are not at the {r}."
        return None

    def _require_state(self) -> RoomsState:
        if self.state is None:
            raise RuntimeError("call reset(seed) before step()")
        return self.state

    # -- the scripted expert

    def expert_action(self) -> str:
        """The next action of the scripted expert. It reads the hidden state, so from a reset it reaches
        the goal in at most EXPERT_MAX_STEPS steps (go, open, take, go, open, put); from any other state it
        still gets there (a wrong object in hand is put down where the agent stands first)."""
        s = self._require_state()
        if s.done:
            raise RuntimeError("the episode is over")
        if s.holding is not None and s.holding != s.goal_object:
            # put the wrong object down here, or at the first receptacle when standing nowhere
            target, obj = s.at or s.receptacles[0], s.holding
        elif s.holding == s.goal_object:
            target, obj = s.goal_receptacle, s.goal_object
        else:
            target, obj = next(r for r, items in s.contents.items() if s.goal_object in items), None
        if s.at != target:
            return f"go to {target}"
        if target in s.closed:
            return f"open {target}"
        if obj is None:
            return f"take {s.goal_object}"
        return f"put {obj} {preposition(target)} {target}"
