"""Tiny random models (a Llama, and one of each family whose attention differs) with a byte-level BPE tokenizer
trained on the fly: the test/smoke models.

Byte-level means any text round-trips; the few merges keep sequences short enough for fast tests.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Merges come from this text; any other text still encodes (as bytes).
_CORPUS = """\
In this task, you are given a review. Your task is to classify the sentiment of the review as positive
or negative. The following are multiple choice questions (with answers) about the subject. Answer:
The movie was great and the acting was wonderful. The product broke after one day, a terrible purchase.
Question: which of the following is true? A. the first B. the second C. the third D. the fourth
Evaluate the result of a random Boolean expression. True and False or not True is False.
system user assistant You are a helpful assistant. Input: Output: POS NEG Positive Negative yes no
"""


def chatml_template() -> str:
    return resources.files("sftflow.configs").joinpath("templates/chatml.jinja").read_text().strip()


def build_tokenizer(vocab_size: int, model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token=None, model_max_length=model_max_length)
    fast.chat_template = chatml_template()
    return fast


def build_tiny_llama(dest: Path, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     vocab_size: int = 512, model_max_length: int = 4096, seed: int = 0,
                     num_kv_heads: int | None = None) -> Path:
    return build_tiny(dest, "llama", hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                      vocab_size=vocab_size, model_max_length=model_max_length, seed=seed, num_kv_heads=num_kv_heads)


# Each family's attention variants, small enough to see: windows of 8 tokens, a mix of local and global layers.
_LOCAL_GLOBAL = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8,
                                                  "max_window_layers": 1}),
    # Softcap 50 (Gemma 2's own) would not bend the small scores of random weights: 2 does.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_LOCAL_GLOBAL, "attn_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", _LOCAL_GLOBAL),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {**_LOCAL_GLOBAL, "num_local_experts": 4,
                                                      "num_experts_per_tok": 2}),
}


def build_tiny(dest: Path, family: str = "llama", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               vocab_size: int = 512, model_max_length: int = 4096, seed: int = 0, num_kv_heads: int | None = None,
               **config) -> Path:
    """A random model of one family (FAMILIES) with the byte-level ChatML tokenizer, saved to dest."""
    import torch
    import transformers

    config_name, model_name, variants = FAMILIES[family]
    tok = build_tokenizer(vocab_size, model_max_length)
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_name)(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=model_max_length, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **{**variants, **config})
    model = getattr(transformers, model_name)(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest
