"""Rollout HTTP API models (DESIGN.md 3.2). Pydantic validates every request; errors become 422."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Greedy decoding through the sampling API: the smallest top_p it accepts is > 0, and a nucleus this small
# keeps only the argmax token.
GREEDY_TOP_P = 1e-6


class GenerateRequest(BaseModel):
    """Either `prompts` (token ids) or `texts` (tokenised with the model's tokenizer), not both."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["12+34="], "n": 4, "max_new_tokens": 16, "top_p": 0.9, "seed": 0},
                {"prompts": [[1, 5, 6, 7]], "n": 2, "max_new_tokens": 8, "return_top_k": 4},
            ]
        },
    )

    prompts: list[list[int]] | None = Field(None, description="token-id prompts", max_length=4096)
    texts: list[str] | None = Field(None, description="text prompts", max_length=4096)
    chat_template: bool = Field(False, description="wrap each text as a user message with the chat template")
    n: int = Field(1, ge=1, le=256, description="samples per prompt")
    max_new_tokens: int = Field(64, ge=1, le=65536)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus: smallest set with mass >= top_p")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same samples")
    first_sample_index: int = Field(
        0,
        ge=0,
        le=65535,
        description="sample j of this request is sample first_sample_index + j of a request with the same seed "
        "and a larger n: a group's G samples sent as G requests of n = 1 are the samples of one n = G request",
    )
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="default: the model's eos")
    return_top_k: int = Field(0, ge=0, le=256, description="behaviour top-k ids/logprobs per position")

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> GenerateRequest:
        if (self.prompts is None) == (self.texts is None):
            raise ValueError("give exactly one of `prompts` or `texts`")
        items = self.prompts if self.prompts is not None else self.texts
        if not items:
            raise ValueError("no prompts")
        if self.prompts is not None and any(len(p) == 0 for p in self.prompts):
            raise ValueError("empty prompt")
        return self


FinishReason = Literal["stop", "length"]


class Sample(BaseModel):
    """One completion. A weight update does not wait for generations in flight: it applies at their next
    decoding step, so a sample's tokens may come from two or more versions (versions only increase along
    a sample). Each token's logprob is from the weights that sampled it."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float] = Field(description="behaviour log pi(y_t | c_t), full vocabulary, temperature 1")
    finish_reason: FinishReason
    first_token_version: int = Field(description="policy version that sampled token_ids[0] (the oldest)")
    last_token_version: int = Field(description="policy version that sampled token_ids[-1] (the newest)")
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class GenerateResponse(BaseModel):
    policy_version: int = Field(
        description="the oldest version any returned token was sampled under: min of first_token_version"
    )
    prompt_ids: list[list[int]] = Field(description="the tokenised prompts, in request order")
    samples: list[Sample]


class WeightInfo(BaseModel):
    version: int
    num_parameters: int
    sha256: str = Field(description="sha256 over the served state dict (names, dtypes, shapes, bytes)")


class LoadWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="safetensors file (or directory of them) on storage shared with the server")
    version: int = Field(ge=0)


class ErrorResponse(BaseModel):
    detail: str
