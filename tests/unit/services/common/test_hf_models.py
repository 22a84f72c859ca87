"""load_causal_lm: concurrent loads keep weight tying working in the process; a disabled tie is refused."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.modeling_utils import PreTrainedModel

from experiments.tiny_models import tiny_llama_config
from services.common.hf_models import load_causal_lm, tying_intact


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    config = tiny_llama_config(vocab_size=48, hidden_size=64, num_layers=1)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tied")
    LlamaForCausalLM(config).save_pretrained(path)
    return path, config


def test_concurrent_loads_keep_tying(tied_dir):
    # Plain from_pretrained in two threads left tie_weights a no-op for good within 2 tries on the project's
    # machine (transformers swaps it class-wide while loading); through the lock it never does.
    path, config = tied_dir
    for _ in range(8):
        loaded: list = []
        threads = [
            threading.Thread(target=lambda out=loaded: out.append(load_causal_lm(str(path))))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(loaded) == 3 and tying_intact()
        for model in loaded:
            assert model.lm_head.weight is model.model.embed_tokens.weight
    fresh = LlamaForCausalLM(config)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_a_disabled_tie_is_refused_before_loading(tied_dir, monkeypatch):
    path, _ = tied_dir
    monkeypatch.setattr(PreTrainedModel, "tie_weights", lambda self, *a, **k: None)
    assert not tying_intact()
    with pytest.raises(RuntimeError, match="weight tying is disabled in this process \\(before the load\\)"):
        load_causal_lm(str(path))
