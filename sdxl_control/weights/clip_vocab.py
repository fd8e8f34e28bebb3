"""OpenAI CLIP's BPE tokenizer, rebuilt offline from the merges file the ``open-clip-torch`` wheel ships.

SDXL's two tokenizers are this tokenizer (49,408 tokens) with different padding tokens. No model hub is needed for
it: the vocabulary is the byte alphabet, the same with the end-of-word mark, one token per merge, and the two
special tokens, in that order, as CLIP builds it.

Example:
    >>> tok = write_clip_tokenizer(Path("/tmp/tokenizer"), pad_token="!")   # doctest: +SKIP
    >>> tok("a photo of a cat").input_ids                                  # doctest: +SKIP
    [49406, 320, 1125, 539, 320, 2368, 49407]
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

__all__ = ["clip_bpe", "write_clip_tokenizer"]

MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to code points above 255.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's vocabulary (49,408 tokens) and BPE merges, from the ``open-clip-torch`` wheel's merges file."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed; it carries the CLIP BPE merges SDXL's tokenizers need")
    gz = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(gz).read().decode("utf-8").split("\n")
    merges = lines[1 : MERGES + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, pad_token: str) -> Any:
    """Write CLIP's tokenizer to ``folder`` (vocab.json, merges.txt, tokenizer config) and return it, 77 tokens
    long, padded with ``pad_token`` (SDXL's first tokenizer pads with ``<|endoftext|>``, its second with ``!``)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
