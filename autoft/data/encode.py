"""Turn raw inputs into the first stage's input, as a backbone's :class:`Preprocessing` says.

Images: uint8 HxWxC → float, grey repeated to 3 channels, the weights' preset (shorter side resized to
``resize_size``, centre crop ``input_size``) or, without one, resized to the input size; normalised.  Text: tokenised to ``max_length`` and trimmed to the longest example.
"""
from __future__ import annotations

import torch

from autoft.zoo.base import Preprocessing


def encode_images(images, pre: Preprocessing, batch: int = 512) -> torch.Tensor:
    """Every image, decoded once, as one tensor (N, C, S, S): the backbone's evaluation transform.

    The numbers come from :func:`autoft.export.runtime.encode_images`, the function an exported model
    serves with, so training, export and predict preprocess identically."""
    from autoft.export.runtime import encode_images as _encode, preset_image

    p = pre.to_dict()
    if not p.get("resize_size") or len(images) == 0:
        return _encode(images, p, batch)
    # with a preset each image is encoded alone: written straight into the result, so that encoding N
    # images holds one N-image tensor, not a list of N tensors and their stacked copy as well
    out = None
    for i, x in enumerate(images):
        t = preset_image(x, p)
        if out is None:
            out = torch.empty((len(images), *t.shape), dtype=t.dtype)
        out[i] = t
    return out


def image_nbytes(n: int, pre: Preprocessing) -> int:
    """Bytes of ``n`` images encoded as float32 at the backbone's input size."""
    return int(n) * int(pre.channels) * int(pre.input_size or 0) ** 2 * 4


def streamed(n: int, pre: Preprocessing, budget: int) -> bool:
    """Whether ``n`` images for ``pre`` are streamed rather than encoded into memory: their float32
    tensor at the input size would exceed ``budget`` bytes (the rule of ``fine_tune_and_score``, the
    ranking and the evaluation; see :func:`autoft.core.train.memory_budget`).  Text is never streamed."""
    return pre.modality == "image" and image_nbytes(n, pre) > budget


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def encode_texts(texts: list[str], pre: Preprocessing, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    tok = tokenizer or load_tokenizer(pre.tokenizer)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=pre.max_length,
              return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    longest = int(mask.sum(1).max()) if len(mask) else 1
    return ids[:, :longest].contiguous(), mask[:, :longest].contiguous()


def encode(inputs: list, pre: Preprocessing):
    """All inputs as one state (tensor for images, ``(ids, mask)`` for text)."""
    if pre.modality == "text":
        return encode_texts(inputs, pre)
    return encode_images(inputs, pre)
