"""Tiny Hugging Face models with real tokenizers, created locally (tests, toy task, demo).

Nothing is downloaded: a character-level `tokenizers` WordLevel tokenizer is built from an alphabet and
wrapped as a `PreTrainedTokenizerFast`; a Llama with random weights is initialised from a seed. Both are
saved in Hugging Face format so every backend loads them through the same code as a hub id or path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, UNK = "<pad>", "<s>", "<unk>"
STUDENT_EOS, TEACHER_EOS = "</s>", "<|im_end|>"
DEFAULT_ALPHABET = "0123456789+-*=()[]<>.,:;?! abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
DEFAULT_SPECIALS = (PAD, BOS, UNK, STUDENT_EOS, TEACHER_EOS)


def build_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET,
    special_tokens: Sequence[str] = DEFAULT_SPECIALS,
    eos_token: str = STUDENT_EOS,
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: special tokens get the first ids, then one id per character."""
    vocab: dict[str, int] = {}
    for tok in list(special_tokens) + list(dict.fromkeys(alphabet)):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(special_tokens))
    extra = [s for s in special_tokens if s not in (PAD, BOS, UNK, eos_token)]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=eos_token,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=extra,
    )


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> LlamaConfig:
    """head_dim = hidden_size / num_heads; keep it 32 or 64 (vLLM's CPU attention rejects 16)."""
    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **ids,
    )


def make_tiny_llama(
    out_dir: str | Path,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **config_kw,
) -> Path:
    """Create a random-init tiny Llama + tokenizer under `out_dir` (HF format, safetensors)."""
    out = Path(out_dir)
    tokenizer = tokenizer or build_char_tokenizer()
    config = tiny_llama_config(len(tokenizer), tokenizer=tokenizer, **config_kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    save_model(model, tokenizer, out)
    return out


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
