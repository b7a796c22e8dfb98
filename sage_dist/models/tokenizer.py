"""The real CLIP BPE tokenizer, offline.

Stable Diffusion's tokenizer is OpenAI CLIP's byte-level BPE (49,408 ids). The Hub is out of reach here,
but the same vocabulary ships inside the ``open-clip-torch`` wheel as ``bpe_simple_vocab_16e6.txt.gz``
(MIT). :func:`build_clip_tokenizer` converts it once into the ``vocab.json`` + ``merges.txt`` pair that
transformers' ``CLIPTokenizer`` reads , caching the files.

"a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407], the ids SD v1.4 uses.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # 48,894, as in OpenAI CLIP's SimpleTokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (order matters: it fixes the first 256 ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open_clip package.

    Raises:
        FileNotFoundError: open-clip-torch is not installed (``pip install open-clip-torch``).
    """
    try:
        ref = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "the CLIP BPE vocabulary comes from the open-clip-torch package: pip install open-clip-torch") from err
    path = Path(str(ref))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip package; reinstall open-clip-torch")
    return path


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for the CLIP BPE into ``out_dir``; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(vocab) == 49408, len(vocab)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def _cache_dir() -> Path:
    root = Path(os.environ.get("SAGE_DIST_CACHE", Path.home() / ".cache" / "sage_dist"))
    return root / "clip_tokenizer"


@lru_cache(maxsize=2)
def build_clip_tokenizer(pad_token: str = EOS):
    """The CLIP tokenizer used by SD 1.x (pad "<|endoftext|>") or SD 2.x / SDXL's second encoder (pad "!").

    Returns:
        transformers.CLIPTokenizer with ``model_max_length=77``.
    """
    from transformers import CLIPTokenizer

    cache = _cache_dir()
    if not (cache / "vocab.json").is_file() or not (cache / "merges.txt").is_file():
        write_clip_tokenizer_files(cache)
    vocab = json.loads((cache / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (cache / "merges.txt").read_text().splitlines()[1:] if line]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
    )
