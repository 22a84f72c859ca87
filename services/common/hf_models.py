"""Loading a Hugging Face causal LM: one load at a time per process.

While `from_pretrained` runs, transformers replaces `PreTrainedModel.tie_weights` with a no-op for the
whole class (`transformers.initialization.no_tie_weights`) and puts back what it found on exit. Two loads
overlapping in threads (the rollout engine loads in a worker thread; an in-process stack loads a teacher
beside it) interleave those swaps, and the second one to exit can put the no-op back for good: every model
built afterwards with `tie_word_embeddings` keeps an untied head, silently (the trainer would then train a
head the rollout's tied model does not have). Every load in this project goes through `load_causal_lm`,
which holds a process-wide lock around `from_pretrained` and checks the class attribute after it.
"""

from __future__ import annotations

import threading
from typing import Any

_LOAD_LOCK = threading.Lock()


def tying_intact() -> bool:
    """Whether `PreTrainedModel.tie_weights` is transformers' own method (not a load's no-op left behind)."""
    from transformers.modeling_utils import PreTrainedModel

    method = PreTrainedModel.__dict__.get("tie_weights")
    return getattr(method, "__qualname__", "") == "PreTrainedModel.tie_weights"


def load_causal_lm(model: str, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(model, **kwargs)` under the process-wide load lock. Raises when
    weight tying is disabled in the process, before the load (a tied checkpoint would get a random head) or
    after it (a load outside this lock overlapped this one)."""
    from transformers import AutoModelForCausalLM

    with _LOAD_LOCK:
        if not tying_intact():
            raise RuntimeError(_UNTIED.format(model=model, when="before"))
        loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        if not tying_intact():
            raise RuntimeError(_UNTIED.format(model=model, when="after"))
    return loaded


_UNTIED = (
    "loading {model}: weight tying is disabled in this process ({when} the load): a model was loaded in "
    "another thread at the same time without load_causal_lm (transformers swaps PreTrainedModel.tie_weights "
    "class-wide while it loads); load models one at a time"
)
