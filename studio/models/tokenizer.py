"""SD's CLIP tokenizer files, rebuilt offline from the CLIP BPE list that ships in ``open_clip_torch``.

Stable Diffusion 1.5 (and both SDXL tokenizers) use OpenAI CLIP's byte-level BPE: 256 byte symbols,
the same 256 with ``</w>``, 48894 merges and two specials, 49408 ids in all (bos 49406, eos 49407),
77 tokens per window. ``open_clip/bpe_simple_vocab_16e6.txt.gz`` holds the merges; ``write_tokenizer``
builds ``vocab.json`` / ``merges.txt`` from it exactly as open_clip's ``SimpleTokenizer`` does, so no
hub access is needed for the real base configs (``studio.draft.base_configs``) or the tiny model kit.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from studio.files import write_text_atomic

# CLIP BPE: 256 byte symbols, 256 byte symbols + "</w>", 48894 merges, 2 specials = 49408 ids.
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID, VOCAB_SIZE, MAX_LENGTH = 49406, 49407, 49408, 77


def write_tokenizer(folder: Path) -> None:
    """Write SD 1.5's CLIPTokenizer files (vocab.json, merges.txt, configs) from open_clip's BPE list."""
    vocab, merges = _clip_vocab_and_merges()
    folder = Path(folder)
    special = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    bos, eos = {**special, "content": BOS_TOKEN}, {**special, "content": EOS_TOKEN}
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": bos,
        "do_lower_case": True,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": eos,
    }
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": EOS_TOKEN, "unk_token": eos}
    write_text_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text_atomic(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    write_text_atomic(folder / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's vocabulary, built exactly as open_clip's SimpleTokenizer builds it."""
    with resources.files("open_clip").joinpath(_BPE_FILE).open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is the "#version" header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode symbol table (byte order defines the first 256 ids)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}
