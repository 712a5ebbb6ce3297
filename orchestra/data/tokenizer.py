"""Byte-level BPE: trained on the corpus with HF `tokenizers`, or an existing tokenizer.json reused.

Byte level with all 256 bytes in the initial alphabet means any text encodes (no unknown token)
and decoding a document's ids gives back its exact text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from orchestra.data.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
MAX_PIECE = 64
# Accepted end-of-document tokens of a user-supplied tokenizer, in order of preference.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")


def train_bpe(documents: Iterable[str], vocab_size: int, num_documents: int | None = None) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE whose id 0 is the EOS token."""
    tokenizer = Tokenizer(models.BPE())
    # Pieces of at most MAX_PIECE byte-level characters: BPE's merges cost quadratic time in the
    # length of one piece, so one long run without spaces (a 500 kB line of "=", a base64 blob)
    # took minutes to train on and to encode. No ordinary word is that long.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            pre_tokenizers.Split(Regex(rf"\S{{{MAX_PIECE}}}"), "isolated"),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=num_documents)
    return tokenizer


def find_eos(tokenizer: Tokenizer, where: str = "tokenizer") -> tuple[str, int]:
    """The (token, id) that ends a document; a tokenizer without one is refused."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, int(token_id)
    raise DataError(
        f"{where}: defines no end-of-document token; it needs one of {list(EOS_CANDIDATES)} "
        "(documents are separated by EOS in the packed shards)"
    )


def read_tokenizer_file(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer.json, turning a missing or malformed file into a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data.tokenizer_path: {path} does not exist (expected a Hugging Face tokenizer.json)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for parse errors
        raise DataError(f"{path}: not a valid Hugging Face tokenizer.json ({err})") from None


def load_tokenizer(dataset_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a prepared dataset was encoded with."""
    return read_tokenizer_file(Path(dataset_dir) / TOKENIZER_FILE)


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Rows the embedding needs: one past the largest id (added tokens included; ids may have gaps)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
