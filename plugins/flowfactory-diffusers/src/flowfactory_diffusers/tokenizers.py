"""In-memory tokenizers for tiny test models: no files, no network.

CLIP is character-level BPE over the byte alphabet (no merges); T5 is a Unigram over a few hundred lowercase
words plus single characters. Imports transformers: use from tiny-model builders only.
"""

from __future__ import annotations

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, Qwen2Tokenizer, T5TokenizerFast

# Whole-word T5 pieces: the words of flowfactory's built-in prompt sets and common image-prompt words.
WORDS: tuple[str, ...] = tuple("""
a an the of in on at with and or to from by for is are this that it its as
red blue green yellow orange purple pink brown black white grey gray gold silver cyan magenta violet
dark light bright pale deep vivid colour color colours colors
square circle triangle star heart line dot stripe shape shapes round big small large tiny huge
car cat dog bird fish horse cow tree flower house sky sea sun moon cloud mountain river road city
apple banana cake cup ball box book chair table window door wall floor grass field forest beach
photo picture image painting drawing sketch portrait landscape close up view scene background
man woman person child people face hand eye hair smile standing sitting running flying
day night morning evening summer winter snow rain fog water fire stone wood metal glass
one two three four five many some high low left right top bottom middle centre center
""".split())


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Character-level CLIP BPE (no merges) over the byte alphabet, each character also as word end."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer() -> T5TokenizerFast:
    """T5 Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, whole lowercase words, then single characters."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for word in WORDS:
        if "\u2581" + word not in seen:
            pieces.append(("\u2581" + word, -4.0))
            seen.add("\u2581" + word)
    for ch in sorted(ByteLevel.alphabet()):
        if ch not in seen:
            pieces.append((ch, -10.0))
            seen.add(ch)
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


QWEN_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """Byte-level Qwen2 BPE (no merges: one token per byte) with Qwen's chat special tokens.

    `<|endoftext|>` pads; `<|im_start|>` and `<|im_end|>` stay single tokens, so chat templates such as
    QwenImagePipeline's prompt template tokenize as on the real tokenizer, only with more tokens."""
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer
