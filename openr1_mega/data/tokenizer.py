"""A small byte-level BPE tokenizer trained locally, in the Qwen chat format.

There is no hub at run time, so tests and the embedded demo train their tokenizer from
text with `tokenizers` and save it as a Hugging Face tokenizer directory that
`transformers.AutoTokenizer` and vLLM both load. Special tokens and the chat template
follow Qwen2 (`<|im_start|>role\\n...<|im_end|>`), so recipes written for real Qwen
models run unchanged on the tiny ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) . , ? !\n"
    "Solve the problem. Think step by step, then give the final answer.\n"
    "<think> First, compute the sum. Next, check it. Finally, answer. </think>"
    "<answer> 42 </answer>\n"
    "Let x = 3. Then 2x + 1 = 7. \\frac{1}{2} \\boxed{7} system user assistant\n"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE tokenizer; digits stay single tokens so arithmetic is learnable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Reasoning tags are single tokens but not special: decoding (vLLM skips special
    # tokens) must keep them in the text, where the format and accuracy rewards read them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json that AutoTokenizer and vLLM load."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def build_tiny_tokenizer(out_dir: str | Path, texts: Iterable[str] | None = None,
                         vocab_size: int = 512) -> Path:
    """Train on `texts` (a small default corpus if None) and save to `out_dir`."""
    corpus = list(texts) if texts is not None else [_DEFAULT_CORPUS] * 4
    return save_hf_tokenizer(train_tokenizer(corpus, vocab_size), out_dir)
