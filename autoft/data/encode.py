"""Turn raw inputs into the first stage's input, as a backbone's :class:`Preprocessing` says.

Images: uint8 HxWxC → float, grey repeated to 3 channels, resized (bilinear, antialiased) to the
input size, normalised.  Text: tokenised to ``max_length`` and trimmed to the longest example.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from autoft.zoo.base import Preprocessing


def encode_images(images: list, pre: Preprocessing, batch: int = 512) -> torch.Tensor:
    size = pre.input_size
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
    out = []
    same = len({tuple(x.shape) for x in images}) == 1
    groups = [images[i:i + batch] for i in range(0, len(images), batch)] if same else [[x] for x in images]
    for group in groups:
        t = torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2).float() / 255.0
        if t.shape[1] == 1 and pre.channels == 3:
            t = t.expand(-1, 3, -1, -1)
        elif t.shape[1] == 4:
            t = t[:, :3]
        if size and tuple(t.shape[-2:]) != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=t.shape[-1] > size)
        out.append((t - mean) / std)
    return torch.cat(out).contiguous()


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
