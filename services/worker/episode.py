"""Multi-turn episodes: the student acts in a text environment through the rollout service, the teacher
scores the student's actions, and the G episodes of one environment seed become one experience record.

Transcript (one sequence per episode; `>` opens every turn):

    prompt      reset observation + "\\n>"                                     (the record's prompt_ids)
    completion  action_1 <end> obs_1 "\\n>" action_2 <end> obs_2 "\\n>" ... action_n <end>

- An action is what the student generates at one turn: top-p sampling through the rollout service until it
  writes a special token (`stop_token_ids` = all of the tokenizer's special ids: normally its own end marker,
  `</s>` for the toy student) or hits `max_new_tokens`. The end marker stays in the transcript, exactly as
  sampled (its behaviour log-probability is real); the environment reads the action's text up to its first
  special token (services/common/verifiers.py `completion_text`).
- The environment's reply is tokenized on its own (`add_special_tokens=False`) and appended after the
  action's tokens; the student never samples those tokens, so they are listed in the sample's
  `env_positions` and carry no loss (trainer/data.py `collate` drops them from `token_mask`). Their
  behaviour/teacher values are finite filler (`ENV_LOGPROB` for the env token itself, `FILLER_LOGPROB` for
  the other K - 1 filler ids), never read by a loss.
- No reply follows the last action (goal reached, turn limit, or context limit): a completion always ends with the
  student's tokens.
- Teacher scoring: one teacher sequence per action, the episode's context up to the end of that action with
  `score_from` at the action's first token, so every student token is scored in its full context (the
  earlier turns, with the environment's replies) and nothing else is scored. All actions of all G episodes
  go in one `TeacherClient.score` call.
- Sampling seeds: turn t uses the request seed `request_seed(sample_seed, t, 0)` and episode i is prompt i of
  that request (the rollout service seeds each prompt's row separately), so the G episodes differ and the
  same settings reproduce the same episodes.
- The record's policy_version is the oldest version of any action token of its episodes (the weights may
  change between turns and within one: the rollout service swaps without draining; staleness is judged by
  the oldest); reward = 1.0 on success, else 0.0; finish_reason is
  "stop" when the environment ended the episode, "length" when the turn or context limit did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
from opd_teacher_client import ScoredRows

from services.common.experience import ExperienceRecord
from services.common.prompts import Prompt
from services.common.verifiers import completion_text
from services.rollout.protocol import GREEDY_TOP_P, GenerateRequest, GenerateResponse, Sample
from services.worker.envs.base import Environment
from services.worker.record import BadPromptError, build_record, request_seed

T = TypeVar("T")


class Caller(Protocol):
    """How a service call is made: `call(fn, name)` runs `fn` (the worker passes its retry policy)."""

    def __call__(self, fn: Callable[[], T], name: str, /) -> T: ...


def call_directly(fn: Callable[[], T], name: str, /) -> T:
    return fn()


TURN_PROMPT = "\n>"  # ends every observation: the model's cue to write an action
ENV_LOGPROB = 0.0  # filler log-probability of an environment token (it is given, not sampled)
FILLER_LOGPROB = -1.0e4  # filler teacher log-probability of the other ids of an env position's "top-K"
REQUEST_SIZE = 64  # episodes per generate call


@dataclass(frozen=True)
class EpisodeSettings:
    group_size: int  # G episodes per environment seed (one record)
    max_turns: int  # actions per episode at most
    max_new_tokens: int  # tokens per action at most
    temperature: float
    top_p: float
    top_k: int  # teacher top-K per student position
    sample_seed: int  # base of the per-turn sampling seeds
    max_context_tokens: int = 0  # end an episode (as a failure) before a turn that could exceed this; 0 = off

    def __post_init__(self) -> None:
        for name in ("group_size", "max_turns", "max_new_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} < 1")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"temperature {self.temperature} must be > 0 and top_p {self.top_p} in (0, 1]")
        if self.max_context_tokens < 0:
            raise ValueError(f"max_context_tokens: {self.max_context_tokens} < 0")


@dataclass
class Episode:
    """One episode's transcript after the prompt (ids relative to the completion) and its outcome."""

    env: Environment
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # completion: actions and env replies
    logprobs: list[float] = field(default_factory=list)  # behaviour log pi per completion token
    env_positions: list[int] = field(default_factory=list)
    actions: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each action
    texts: list[str] = field(default_factory=list)  # each action's text as the environment read it
    versions: list[tuple[int, int]] = field(default_factory=list)  # (first, last) token version per action
    done: bool = False  # the environment ended the episode
    success: bool = False
    cut: bool = False  # the context limit ended it

    @property
    def active(self) -> bool:
        return not (self.done or self.cut)


def observation_text(observation: str) -> str:
    return observation + TURN_PROMPT


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def play(
    episodes: Sequence[Episode],
    *,
    rollout: Any,
    tokenizer: Any,
    max_turns: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    sample_seed: int,
    max_context_tokens: int = 0,
    call: Caller = call_directly,
) -> None:
    """Run the turn loop of `episodes` (already reset, prompt_ids set) in place: every turn, one generate
    call per REQUEST_SIZE active episodes, then each environment's step and reply."""
    stop = sorted(set(tokenizer.all_special_ids))
    for turn in range(max_turns):
        if max_context_tokens:
            for e in episodes:
                if e.active and len(e.prompt_ids) + len(e.ids) + max_new_tokens > max_context_tokens:
                    e.cut = True
                    _drop_trailing_reply(e)
        active = [e for e in episodes if e.active]
        if not active:
            return
        for start in range(0, len(active), REQUEST_SIZE):
            chunk = active[start : start + REQUEST_SIZE]
            request = GenerateRequest(
                prompts=[e.prompt_ids + e.ids for e in chunk],
                n=1,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=request_seed(sample_seed, turn, start),
                stop_token_ids=stop,
            )
            response: GenerateResponse = call(
                functools.partial(rollout.generate, request), "rollout_generate"
            )
            if sorted(s.prompt_index for s in response.samples) != list(range(len(chunk))):
                raise ValueError(f"rollout answered {len(response.samples)} samples for {len(chunk)} prompts")
            for s in response.samples:
                _act(chunk[s.prompt_index], s, tokenizer, last=turn == max_turns - 1)


def _drop_trailing_reply(e: Episode) -> None:
    """End the transcript at the last action: a reply nobody answers carries nothing to learn."""
    end = e.actions[-1][1] if e.actions else 0
    del e.ids[end:], e.logprobs[end:]
    e.env_positions = [t for t in e.env_positions if t < end]


def _act(e: Episode, s: Sample, tokenizer: Any, last: bool) -> None:
    """Append one sampled action, step the environment with its text, append the reply unless it ended."""
    start = len(e.ids)
    e.ids += s.token_ids
    e.logprobs += s.logprobs
    e.actions.append((start, len(e.ids)))
    e.versions.append((s.first_token_version, s.last_token_version))
    text = completion_text(tokenizer, s.token_ids)
    e.texts.append(text)
    result = e.env.step(text)
    if result.done:
        e.done, e.success = True, result.success
        return
    if last:
        return
    reply = encode_text(tokenizer, observation_text(result.observation))
    e.env_positions += range(len(e.ids), len(e.ids) + len(reply))
    e.ids += reply
    e.logprobs += [ENV_LOGPROB] * len(reply)


def _teacher_rows(
    e: Episode, spans: list[tuple[tuple[int, int], ScoredRows]], k: int, vocab: int
) -> ScoredRows:
    """The teacher's rows of a whole completion [L]: scored rows on the actions, filler on env tokens."""
    L = len(e.ids)
    ids_L = np.asarray(e.ids, dtype=np.int64)
    topk_ids_L_K = ((ids_L[:, None] + np.arange(k)[None, :]) % vocab).astype(np.int32)
    topk_lp_L_K = np.full((L, k), FILLER_LOGPROB, dtype=np.float32)
    topk_lp_L_K[:, 0] = ENV_LOGPROB
    target_L = np.full(L, ENV_LOGPROB, dtype=np.float32)
    for (a, z), rows in spans:
        if rows.topk_ids.shape != (z - a, k) or rows.target_logprobs.shape != (z - a,):
            raise ValueError(f"teacher returned {rows.topk_ids.shape} rows for an action of {z - a} tokens")
        topk_ids_L_K[a:z] = rows.topk_ids
        topk_lp_L_K[a:z] = rows.topk_logprobs
        target_L[a:z] = rows.target_logprobs
    return ScoredRows(topk_ids_L_K, topk_lp_L_K, target_L, None)


def run_episodes(
    *,
    make_env: Callable[[], Environment],
    env_seed: int,
    rollout: Any,
    teacher: Any,
    tokenizer: Any,
    settings: EpisodeSettings,
    record_id: str,
    task: str,
    teacher_model_id: str,
    call: Caller = call_directly,
) -> ExperienceRecord:
    """G episodes from one environment seed, scored by the teacher, as one experience record.

    `rollout` is a services.rollout.client.RolloutClient, `teacher` an opd_teacher_client.TeacherClient;
    `call(fn, name)` wraps every service call (the worker's retry; name "rollout_generate" or
    "teacher_score"). See the module docstring for the transcript, the masking and the scoring.
    """
    envs = [make_env() for _ in range(settings.group_size)]
    first = [env.reset(env_seed) for env in envs]
    if len(set(first)) != 1:
        raise ValueError(f"environment seed {env_seed}: reset gave different observations for one seed")
    prompt_text = observation_text(first[0])
    prompt_ids = encode_text(tokenizer, prompt_text)
    episodes = [Episode(env, list(prompt_ids)) for env in envs]
    play(
        episodes,
        rollout=rollout,
        tokenizer=tokenizer,
        max_turns=settings.max_turns,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        sample_seed=settings.sample_seed,
        max_context_tokens=settings.max_context_tokens,
        call=call,
    )
    episodes = [e for e in episodes if e.ids]  # the context limit can stop an episode before its first turn
    if not episodes:  # the worker skips such a seed (bad input) instead of stopping
        raise BadPromptError(
            f"environment seed {env_seed}: prompt of {len(prompt_ids)} tokens leaves no room for an action"
        )
    P = len(prompt_ids)
    sequences, score_from, owners = [], [], []
    for i, e in enumerate(episodes):
        for a, z in e.actions:
            sequences.append(prompt_ids + e.ids[:z])  # [P + z]: the full context of the action
            score_from.append(P + a)
            owners.append((i, (a, z)))
    scored: list[ScoredRows] = call(
        lambda: teacher.score(sequences, score_from=score_from, top_k=settings.top_k, request_id=record_id),
        "teacher_score",
    )
    k = int(scored[0].topk_ids.shape[1])
    per_episode: list[list[tuple[tuple[int, int], ScoredRows]]] = [[] for _ in episodes]
    for (i, span), rows in zip(owners, scored, strict=True):
        per_episode[i].append((span, rows))
    vocab = len(tokenizer)
    teacher_rows = [_teacher_rows(e, spans, k, vocab) for e, spans in zip(episodes, per_episode, strict=True)]
    response = GenerateResponse(
        policy_version=min(first for e in episodes for first, _ in e.versions),
        prompt_ids=[prompt_ids],
        samples=[
            Sample(
                prompt_index=0,
                token_ids=e.ids,
                logprobs=e.logprobs,
                finish_reason="stop" if e.done else "length",
                first_token_version=e.versions[0][0],  # versions only increase along an episode
                last_token_version=e.versions[-1][1],
            )
            for e in episodes
        ],
    )
    record = build_record(
        record_id,
        Prompt(row=env_seed, text=prompt_text),
        response,
        teacher_rows,
        teacher_model_id,
        task,
        rewards=[1.0 if e.success else 0.0 for e in episodes],
    )
    for sample, e in zip(record.samples, episodes, strict=True):
        sample.env_positions = np.asarray(e.env_positions, dtype=np.int32)
    return record


def evaluate_env(
    *,
    make_env: Callable[[], Environment],
    seeds: Sequence[int],
    rollout: Any,
    tokenizer: Any,
    max_turns: int,
    max_new_tokens: int,
    max_context_tokens: int = 0,
) -> float:
    """Greedy success rate: one episode per environment seed, the argmax action at every turn."""
    if not seeds:
        raise ValueError("no environment seeds to evaluate")
    episodes = []
    for seed in seeds:
        env = make_env()
        episodes.append(Episode(env, encode_text(tokenizer, observation_text(env.reset(seed)))))
    play(
        episodes,
        rollout=rollout,
        tokenizer=tokenizer,
        max_turns=max_turns,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=GREEDY_TOP_P,
        sample_seed=0,
        max_context_tokens=max_context_tokens,
    )
    return sum(e.success for e in episodes) / len(episodes)
