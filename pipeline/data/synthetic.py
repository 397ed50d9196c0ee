"""Random-init model folders (a LLaMA decoder, a BERT encoder), for tests and benchmarks (no download).

A real `from_pretrained` folder: config, safetensors weights and a small word-level tokenizer
trained on the given texts, so every loading path runs exactly as for a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]


def make_tokenizer(texts: list[str]):
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_model_dir(
    path: str | Path,
    texts: list[str] | None = None,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Save a random-init LlamaForCausalLM (+ tokenizer) to `path` and return it."""
    path = Path(path)
    texts = texts or ["the quick brown fox jumps over the lazy dog answer1 answer2 answer3 true false"]
    tokenizer = make_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=vocab_size or max(len(tokenizer), 8),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return path


def make_encoder_dir(path: str | Path, texts: list[str], hidden_size: int = 32, intermediate_size: int = 48,
                     num_hidden_layers: int = 2, num_attention_heads: int = 4, seed: int = 0) -> Path:
    """Save a random-init BERT encoder (a `BertModel`, no head: like all-MiniLM-L6-v2's folder)
    with a word-level tokenizer to `path`; `AutoModelForSequenceClassification` adds the head."""
    from transformers import BertConfig, BertModel

    path = Path(path)
    tokenizer = make_tokenizer(texts)
    config = BertConfig(vocab_size=max(len(tokenizer), 8), hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
