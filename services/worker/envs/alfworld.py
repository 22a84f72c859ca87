"""`alfworld`: an adapter over ALFWorld's TextWorld games (https://github.com/alfworld/alfworld).

ALFWorld is not a dependency of this project. To use it:

    pip install alfworld            # brings textworld; the text-only games need nothing else
    alfworld-download               # PDDL + game files into ~/.cache/alfworld (or set ALFWORLD_DATA)

Each `reset(seed)` loads one game: the `seed`-th (modulo the count) of the sorted `game.tw-pddl` files under
`<data_dir>/json_2.1.1/<split>/`, optionally only those whose task directory starts with one of
`task_types` (e.g. "pick_and_place_simple"). The mapping to the Environment interface:

    reset  -> the game's first text, without TextWorld's "-= Welcome to TextWorld, ALFRED! =-" banner
              (it lists the receptacles and states the task, "Your task is to: put a clean mug in ...")
    step   -> the game's feedback text; ALFWorld itself answers an action it does not understand or cannot
              do with "Nothing happens.", so no action raises
    reward -> 1.0 on the step where infos["won"] becomes true, else 0.0; success = won
    done   -> won, or the game's own step limit (`max_episode_steps`)

`admissible_commands` (the list ALFWorld offers after each step) is kept on the adapter for prompts that
want to show it; the episode runner does not use it. Game loading goes through `textworld.gym` with
ALFWorld's `AlfredDemangler` wrapper (object names like "mug 1" instead of internal ids), as ALFWorld's own
`alfworld-play-tw` does. Both packages are imported on first use, so this module imports without them.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from services.worker.envs.base import StepResult

DATA_ENV = "ALFWORLD_DATA"
SPLITS = ("train", "valid_seen", "valid_unseen")
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"


class AlfworldUnavailable(RuntimeError):
    """ALFWorld's packages or game files are missing; the message says what to install or set."""


def clean_observation(text: str) -> str:
    """ALFWorld's text without the TextWorld banner and surrounding blank lines."""
    return text.replace(_BANNER, "").strip()


def to_step_result(observation: str, done: bool, infos: dict[str, Any]) -> StepResult:
    """One TextWorld step (feedback, done, infos with a `won` flag) as a StepResult."""
    won = bool(_first(infos.get("won", False)))
    return StepResult(clean_observation(observation), 1.0 if won else 0.0, bool(done) or won, won)


def _first(value: Any) -> Any:
    # textworld's batched envs wrap every info in a list of one
    return value[0] if isinstance(value, list | tuple) else value


def find_games(data_dir: str | Path, split: str, task_types: tuple[str, ...] = ()) -> list[str]:
    """Sorted game files of one split (optionally only some task types)."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    root = Path(data_dir) / "json_2.1.1" / split
    files = sorted(glob.glob(str(root / "**" / "game.tw-pddl"), recursive=True))
    if task_types:
        files = [f for f in files if Path(f).relative_to(root).parts[0].startswith(tuple(task_types))]
    if not files:
        raise AlfworldUnavailable(
            f"no ALFWorld games (game.tw-pddl) under {root}"
            + (f" for task types {task_types}" if task_types else "")
            + f": run `alfworld-download` or point {DATA_ENV} / data_dir at the data"
        )
    return files


def _import_textworld() -> tuple[Any, Any]:
    try:
        import textworld
        import textworld.gym
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    except ImportError as e:
        raise AlfworldUnavailable(
            f"the alfworld environment needs the `alfworld` package (pip install alfworld; it brings "
            f"textworld) and its game files (alfworld-download, or set {DATA_ENV}): {e}"
        ) from e
    return textworld, AlfredDemangler


class AlfworldEnv:
    """ALFWorld text games behind the Environment interface (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | None = None,
        split: str = "train",
        task_types: tuple[str, ...] | list[str] = (),
        max_episode_steps: int = 50,
    ) -> None:
        self._textworld, self._demangler = _import_textworld()
        data_dir = data_dir or os.environ.get(DATA_ENV) or str(Path.home() / ".cache" / "alfworld")
        self.games = find_games(data_dir, split, tuple(task_types))
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps: {max_episode_steps} < 1")
        self.max_episode_steps = max_episode_steps
        self.admissible_commands: list[str] = []
        self._env: Any = None
        self._won = False

    def reset(self, seed: int) -> str:
        tw = self._textworld
        game = self.games[seed % len(self.games)]
        infos = tw.EnvInfos(won=True, admissible_commands=True)
        env_id = tw.gym.register_game(
            game, infos, max_episode_steps=self.max_episode_steps, wrappers=[self._demangler()]
        )
        if self._env is not None:
            self._env.close()
        self._env = tw.gym.make(env_id)
        observation, infos = self._env.reset()
        self._won = False
        self.admissible_commands = list(_first(infos.get("admissible_commands", [])) or [])
        return clean_observation(_first(observation))

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise RuntimeError("call reset(seed) before step()")
        if self._won:
            return StepResult("the episode is over.", 0.0, True, True)
        observation, _score, done, infos = self._env.step(str(action))
        self.admissible_commands = list(_first(infos.get("admissible_commands", [])) or [])
        result = to_step_result(_first(observation), _first(done), infos)
        self._won = result.success
        return result

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
