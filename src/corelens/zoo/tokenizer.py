"""An offline word-level tokenizer for tiny test and toy models.

Real checkpoints bring their own tokenizer; tiny models built from configs need one that can be
made without a hub. It is saved to a folder and reloaded, because the bridge crashes on an
in-memory ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>",
    "<image>", "<video>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
    "<|endoftext|>",
]

BASE_WORDS = (
    "user assistant system what is the color of shape in image at row col left right top bottom "
    "above below red green blue yellow white black orange purple cyan gray square circle triangle "
    "cross star dot describe answer question a an and or of to on ? . , : \n"
).split(" ")


def build_tokenizer(
    folder: str | Path,
    words: list[str] | None = None,
    *,
    add_bos: bool = True,
    extra_special: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Build a whitespace word-level tokenizer, save it to ``folder`` and load it back."""
    special = SPECIAL_TOKENS + list(extra_special or [])
    vocab_words = list(dict.fromkeys(special + [w for w in (words or BASE_WORDS) if w] +
                                     [str(d) for d in range(10)]))
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[t for t in special
                                   if t not in ("<s>", "</s>", "<unk>", "<pad>")],
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)
