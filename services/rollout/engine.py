"""Rollout engine interface and the parts every backend shares.

An engine turns a `GenerateRequest` into samples and swaps in new weights. The base class owns what must
behave the same on every backend: prompt tokenisation and request checks, the policy version, weight
validation (names, shapes, dtypes against the live model, before anything is touched), the state hash,
and the update lock that serialises weight updates.

Swaps do not drain: generation never takes the update lock. A backend's `_install` replaces the weights
between two decoding steps of the generations in flight (hf: between steps of its decode loop; vLLM:
`pause_generation(mode="keep")`), which then continue under the new weights; each sample says which
versions sampled its first and last tokens, and a response's `policy_version` is the oldest of them.
Backends implement `_generate` and `_install`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load

from services.rollout.protocol import GenerateRequest, GenerateResponse, Sample, WeightInfo

log = logging.getLogger(__name__)

_MAX_LISTED = 8  # names listed in a validation error before "... and N more"


class RequestError(ValueError):
    """The request cannot be served as given (the client can fix it): HTTP 422 with this message."""


class WeightsError(RequestError):
    """A weight update is malformed or does not fit the live model: HTTP 422, old weights keep serving."""


class VersionConflict(Exception):
    """A weight update's version is not above the served one: HTTP 409."""


class EngineUnavailable(Exception):
    """The engine cannot serve right now (not loaded, shutting down): HTTP 503, clients retry."""


# ---------------------------------------------------------------------------------------------------------
# Weight schema, validation and hashing


TensorSpec = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class WeightSchema:
    """What a full state dict for the live model must hold.

    `specs` are the distinct tensors (parameters and persistent buffers), in state-dict order; `aliases`
    maps a tied name (e.g. `lm_head.weight` with tied embeddings) to the tensor it shares. An update must
    hold every spec and may hold aliases (their values are ignored: the tied tensor is the spec's).
    """

    specs: dict[str, TensorSpec]
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> WeightSchema:
        """Read the schema from a module (real or on the meta device). Ties are found by object identity."""
        specs: dict[str, TensorSpec] = {}
        aliases: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in first_name:
                aliases[name] = first_name[id(tensor)]
                continue
            first_name[id(tensor)] = name
            specs[name] = (tuple(tensor.shape), tensor.dtype)
        return cls(specs, aliases)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.specs.values())

    def validate(self, shapes: Mapping[str, TensorSpec]) -> None:
        """Raise WeightsError naming every missing/unexpected name and every shape or dtype mismatch."""
        names = set(shapes)
        problems: list[str] = []
        missing = [n for n in self.specs if n not in names]
        unexpected = sorted(names - set(self.specs) - set(self.aliases))
        if missing:
            problems.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}")
        mismatched = []
        for name, (shape, dtype) in shapes.items():
            target = self.aliases.get(name, name)
            if target not in self.specs:
                continue
            want_shape, want_dtype = self.specs[target]
            if tuple(shape) != want_shape or dtype != want_dtype:
                mismatched.append(
                    f"{name}: got {list(shape)} {_dtype_name(dtype)}, "
                    f"want {list(want_shape)} {_dtype_name(want_dtype)}"
                )
        if mismatched:
            problems.append(f"{len(mismatched)} shape/dtype mismatch(es): {_listing(mismatched)}")
        if problems:
            raise WeightsError("weights do not fit the served model: " + "; ".join(problems))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}, ... and {len(items) - _MAX_LISTED} more"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def state_sha256(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> str:
    """sha256 over `names` in sorted order: each name, dtype and shape, then the raw little-endian bytes.

    Independent of how the weights arrived (file, PUT body, initial load) and of the device they live on.
    """
    h = hashlib.sha256()
    for name in sorted(names):
        t = tensors[name].detach()
        h.update(f"{name}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\n".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        # view as bytes: works for every dtype, including bf16 (which numpy lacks)
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def parse_safetensors(body: bytes) -> dict[str, torch.Tensor]:
    """Parse a safetensors body (never pickle). Any malformation is a WeightsError."""
    if not body:
        raise WeightsError("empty body: expected the safetensors bytes of the full state dict")
    try:
        return safetensors_load(body)
    except Exception as e:  # safetensors raises several types for malformed input; all mean "bad body"
        raise WeightsError(f"unparsable safetensors body: {e}") from e


def safetensors_files(path: str | Path, root: str | Path | None = None) -> list[Path]:
    """A safetensors file, or the sorted `*.safetensors` files of a directory (which must lie under `root`)."""
    try:
        p = Path(path).resolve()
        inside = root is None or p.is_relative_to(Path(root).resolve())
        is_dir, is_file = p.is_dir(), p.is_file()
        files = sorted(p.glob("*.safetensors")) if is_dir else [p]
    except (OSError, ValueError) as e:  # e.g. an embedded NUL byte, a name too long, no permission
        raise WeightsError(f"cannot read {str(path)!r}: {e}") from e
    if not inside:
        raise WeightsError(f"{str(path)!r} is outside the weights directory {str(root)!r}")
    if is_dir and not files:
        raise WeightsError(f"{str(path)!r} holds no *.safetensors file")
    if not is_dir and not is_file:
        raise WeightsError(f"{str(path)!r} is not a file or directory on the server")
    return files


def read_safetensors_files(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                    if name in tensors:
                        raise WeightsError(f"tensor {name!r} appears in more than one file under {f.parent}")
                    tensors[name] = fh.get_tensor(name)
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"unreadable safetensors file {str(f)!r}: {e}") from e
    return tensors


@dataclass
class StagedWeights:
    """A validated update, ready to install: CPU tensors, their hash, and where they came from."""

    tensors: dict[str, torch.Tensor]
    sha256: str
    version: int
    body: bytes | None = None  # the PUT body (valid safetensors), when pushed over HTTP
    files: list[Path] = field(default_factory=list)  # the checkpoint files, when loaded from a path
    temp_files: list[Path] = field(default_factory=list)  # written by a backend's _prepare; removed after


# ---------------------------------------------------------------------------------------------------------
# Engine


@dataclass
class GenerateParams:
    """Per-request sampling parameters after defaults are resolved."""

    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_token_ids: list[int]
    return_top_k: int
    first_sample_index: int = 0  # sample j is sample first_sample_index + j of the same seed's n > j requests
    # set when the request is abandoned (its client disconnected): a backend decoding in a thread stops at
    # its next step; an async backend (vLLM) aborts on the task's cancellation itself
    cancel: threading.Event = field(default_factory=threading.Event)


class RolloutEngine(ABC):
    """Backend-independent engine: subclasses load the model and implement `_generate` and `_install`."""

    backend: str = ""

    def __init__(
        self,
        *,
        tokenizer,
        schema: WeightSchema,
        sha256: str,
        version: int,
        vocab_size: int,
        max_model_len: int,
        eos_token_ids: list[int],
        seed: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.schema = schema
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self._sha256 = sha256
        self._version = version
        # serialises weight updates (version check, install, version bump); generation never takes it
        self._update_lock = asyncio.Lock()
        self.failure: str | None = None  # set when an install failed halfway: the weights are unknown
        # requests without a seed draw one here: reproducible for a whole server run given cfg.seed
        self._seeds = torch.Generator().manual_seed(seed)

    # -- public API used by the HTTP handlers ----------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def weight_info(self) -> WeightInfo:
        self._check_healthy()  # after a failed install the served weights are unknown
        return WeightInfo(
            version=self._version, num_parameters=self.schema.num_parameters, sha256=self._sha256
        )

    @property
    def ready(self) -> bool:
        return self.failure is None

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        prompt_ids = self.tokenize(req)
        params = self.resolve_params(req, prompt_ids)
        self._check_healthy()
        try:
            samples = await self._generate(prompt_ids, params)  # weight updates may land between its steps
        except asyncio.CancelledError:
            params.cancel.set()
            raise
        # an install that failed meanwhile left unknown weights under this request's later tokens
        self._check_healthy()
        # conservative: staleness is judged by the oldest weights behind any returned token
        version = min(s.first_token_version for s in samples)
        return GenerateResponse(policy_version=version, prompt_ids=prompt_ids, samples=samples)

    async def put_weights(self, body: bytes, version: int) -> WeightInfo:
        """Install the safetensors `body` (the full state dict) as `version`."""
        self._check_version(version)
        staged = StagedWeights({}, "", version, body=body)
        await asyncio.to_thread(self._stage, staged, lambda: parse_safetensors(body))
        return await self._swap(staged)

    async def put_tensors(self, tensors: dict[str, torch.Tensor], version: int) -> WeightInfo:
        """Install already-received CPU tensors (the full state dict) as `version` (a collective transfer)."""
        self._check_version(version)
        staged = StagedWeights({}, "", version)
        await asyncio.to_thread(self._stage, staged, lambda: tensors)
        return await self._swap(staged)

    async def load_weights(self, path: str, version: int, root: str | None = None) -> WeightInfo:
        """Install the safetensors checkpoint at `path` (a file or a directory of them) as `version`."""
        self._check_version(version)
        files = safetensors_files(path, root)
        staged = StagedWeights({}, "", version, files=files)
        await asyncio.to_thread(self._stage, staged, lambda: read_safetensors_files(files))
        return await self._swap(staged)

    # -- streamed updates (services/rollout/weights_stream.py) ------------------------------------------

    def check_version(self, version: int) -> None:
        """Raise VersionConflict (409) unless `version` is above the served one: before a body is read."""
        self._check_version(version)

    async def put_received(
        self, tensors: dict[str, torch.Tensor], version: int, *, wait_sha256: bool = True
    ) -> WeightInfo:
        """Install tensors that a streamed PUT received into buffers it owns (CPU, writable) as `version`.

        Validated again (names, shapes, dtypes only: no data is read), prepared by the backend and swapped
        in without hashing first: the sha256 of the served state is computed after the swap, in a thread,
        so generation serves the new weights that much sooner. Until it is known `weight_info()` reports
        sha256 "" and `settled_weight_info()` waits for it. `wait_sha256`: return only once it is known
        (the response then carries it); else at once, with sha256 "".
        """
        self._check_version(version)
        staged = StagedWeights({}, "", version)

        def stage() -> None:
            self.schema.validate(tensor_specs(tensors))
            staged.tensors = dict(tensors)  # the backend replaces it; `tensors` stays for the hash
            self._prepare(staged)

        try:
            await asyncio.to_thread(stage)
        except BaseException:
            for path in staged.temp_files:  # _swap removes them, but it is not reached
                path.unlink(missing_ok=True)
            raise
        info = await self._swap(staged)
        task = asyncio.create_task(self._hash_after_swap(tensors, version))
        self._sha256_pending: asyncio.Task[str] | None = task
        if not wait_sha256:
            return info
        return info.model_copy(update={"sha256": await asyncio.shield(task)})

    async def _hash_after_swap(self, tensors: dict[str, torch.Tensor], version: int) -> str:
        try:
            digest = await asyncio.to_thread(state_sha256, tensors, self.schema.specs)
        except Exception:
            log.exception("hashing weights version %d failed", version)
            return ""
        if self._version == version and not self._sha256:  # not replaced since (a later swap hashes anew)
            self._sha256 = digest
            log.info("weights version %d: sha256 %s", version, digest[:12])
        return digest

    async def settled_weight_info(self) -> WeightInfo:
        """`weight_info()` once the sha256 of the served weights is known (see `put_received`)."""
        while True:
            task: asyncio.Task[str] | None = getattr(self, "_sha256_pending", None)
            if task is None or task.done():
                return self.weight_info()
            await asyncio.shield(task)

    @abstractmethod
    async def close(self) -> None:
        """Release the backend's threads, processes and memory."""

    # -- shared request handling ------------------------------------------------------------------------

    def tokenize(self, req: GenerateRequest) -> list[list[int]]:
        if req.prompts is not None:
            if req.chat_template:
                raise RequestError("chat_template applies to `texts` only; `prompts` are already token ids")
            return [list(p) for p in req.prompts]
        assert req.texts is not None  # the protocol model guarantees one of the two
        if req.chat_template and not self.tokenizer.chat_template:
            raise RequestError("chat_template=true but the model's tokenizer has no chat template")
        prompts = []
        for i, text in enumerate(req.texts):
            if req.chat_template:
                # render to text, then tokenise without extra specials: the template spells them itself
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(text)["input_ids"]
            if not ids:
                raise RequestError(f"texts[{i}] tokenises to an empty prompt")
            prompts.append(list(ids))
        return prompts

    def resolve_params(self, req: GenerateRequest, prompt_ids: list[list[int]]) -> GenerateParams:
        """Check the request against the model (ids in range, lengths) and fill in the defaults."""
        for i, p in enumerate(prompt_ids):
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"prompts[{i}]: token id {bad[0]} outside [0, {self.vocab_size})")
            if len(p) + req.max_new_tokens > self.max_model_len:
                raise RequestError(
                    f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens {req.max_new_tokens} "
                    f"exceeds max_model_len {self.max_model_len}"
                )
        stop = self.eos_token_ids if req.stop_token_ids is None else list(req.stop_token_ids)
        bad_stop = [t for t in stop if not 0 <= t < self.vocab_size]
        if bad_stop:
            raise RequestError(f"stop_token_ids: {bad_stop[0]} outside [0, {self.vocab_size})")
        if req.return_top_k > self.vocab_size:
            raise RequestError(
                f"return_top_k {req.return_top_k} exceeds the vocabulary size {self.vocab_size}"
            )
        seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, (), generator=self._seeds))
        return GenerateParams(
            n=req.n,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=seed,
            stop_token_ids=stop,
            return_top_k=req.return_top_k,
            first_sample_index=req.first_sample_index,
        )

    # -- weights ----------------------------------------------------------------------------------------

    def _check_healthy(self) -> None:
        if self.failure is not None:
            raise EngineUnavailable(self.failure)

    def _check_version(self, version: int) -> None:
        if version <= self._version:
            raise VersionConflict(f"version {version} is not above the served version {self._version}")

    def _stage(self, staged: StagedWeights, read: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Read, validate against the live schema, hash, let the backend prepare (in a thread, off the loop)."""
        tensors = read()
        self.schema.validate(tensor_specs(tensors))
        staged.tensors, staged.sha256 = tensors, state_sha256(tensors, self.schema.specs)
        self._prepare(staged)

    @abstractmethod
    def _prepare(self, staged: StagedWeights) -> None:
        """Backend work done before the update lock, while generation goes on (runs in a thread)."""

    async def _swap(self, staged: StagedWeights) -> WeightInfo:
        try:
            async with self._update_lock:
                self._check_healthy()
                self._check_version(staged.version)  # a concurrent update may have won while we validated
                try:
                    await self._install(staged)
                except Exception as e:
                    # validated before, so this is a backend fault and the weights may be partly replaced:
                    # stop serving (readyz turns 503) rather than sample from a mix
                    self.failure = f"weight install of version {staged.version} failed: {e}"
                    log.exception("weight install failed; engine marked unavailable")
                    raise EngineUnavailable(self.failure) from e
                self._version, self._sha256 = staged.version, staged.sha256
                info = self.weight_info()  # under the lock: a later update cannot slip in between
        finally:
            for path in staged.temp_files:
                path.unlink(missing_ok=True)
        log.info("serving weights version %d (sha256 %s)", staged.version, staged.sha256[:12])
        return info

    # -- backend hooks ----------------------------------------------------------------------------------

    @abstractmethod
    async def _generate(self, prompt_ids: list[list[int]], params: GenerateParams) -> list[Sample]:
        """Samples for every prompt (prompt-major: prompt 0's n samples first), each labelled with the
        versions that sampled its first and last tokens. Runs while updates install (no lock)."""

    @abstractmethod
    async def _install(self, staged: StagedWeights) -> None:
        """Replace the live weights with `staged` (validated), under the update lock, while generations may
        be in flight: between two of their decoding steps, which continue under `staged` and label the
        tokens they sample from then on with `staged.version`."""


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A per-row seed, so that a row's samples do not depend on how rows are batched."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def default_eos_ids(generation_config, tokenizer) -> list[int]:
    """The model's end-of-sequence ids: generation_config.eos_token_id (int or list), else the tokenizer's."""
    eos = generation_config.eos_token_id if generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
