"""Explanations: attribution maps for images, token attributions for text, and the most confused
class pairs with example inputs.

Attributions are computed with captum (``pip install captum``): Integrated Gradients (Sundararajan et
al., 2017) from a black image for images (or Occlusion), Layer Integrated Gradients on the word
embeddings from a sequence of padding tokens (special tokens kept) for text; always for the class the
model predicted.  The model is the PyTorch :class:`~autoft.core.model.Classifier` (a study's trial,
or an export rebuilt with :func:`autoft.export.export.rebuild_model`), taking encoded inputs.
"""
from __future__ import annotations

import html
import logging
import textwrap
from pathlib import Path

import numpy as np
import torch

from autoft.errors import AutoftError

log = logging.getLogger(__name__)


def _captum():
    try:
        import captum.attr as ca
    except ImportError:
        raise AutoftError("attributions need captum: pip install captum (or leave explanations out with "
                          "--explain 0)") from None
    return ca


def pick_examples(probs: torch.Tensor, preds: torch.Tensor, target: torch.Tensor, k: int) -> dict[str, list[int]]:
    """Row indices of the ``k`` most confident correct and the ``k`` most confident wrong predictions."""
    conf = probs.gather(1, preds[:, None])[:, 0]
    out = {}
    for name, mask in (("correct", preds == target), ("wrong", preds != target)):
        idx = torch.nonzero(mask).flatten()
        order = idx[torch.argsort(conf[idx], descending=True, stable=True)]
        out[name] = order[:k].tolist()
    return out


# -- images ----------------------------------------------------------------------------------------
def image_attributions(model: torch.nn.Module, pixels: torch.Tensor, targets: torch.Tensor, *,
                       method: str = "integrated_gradients", baseline: torch.Tensor | None = None,
                       n_steps: int = 32) -> torch.Tensor:
    """(N, H, W) attribution of every pixel (summed over channels) to the logit of ``targets``."""
    ca = _captum()
    model = model.eval()
    x = pixels.detach().float().clone()
    base = torch.zeros_like(x) if baseline is None else baseline.expand_as(x).contiguous()
    with torch.enable_grad():
        if method == "integrated_gradients":
            attr = ca.IntegratedGradients(model).attribute(x, baselines=base, target=targets, n_steps=n_steps,
                                                           internal_batch_size=max(n_steps, 16))
        elif method == "occlusion":
            h = x.shape[-1]
            w = max(2, h // 8)
            attr = ca.Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1], w, w),
                                                 strides=(x.shape[1], max(1, w // 2), max(1, w // 2)),
                                                 baselines=base, target=targets)
        else:
            raise AutoftError(f"unknown attribution method '{method}'; expected integrated_gradients or occlusion")
    return attr.detach().sum(1)


def black_baseline(preprocessing) -> torch.Tensor | None:
    """A black image in the model's normalised input space, (1, C, 1, 1)."""
    mean, std = getattr(preprocessing, "mean", None), getattr(preprocessing, "std", None)
    if isinstance(preprocessing, dict):
        mean, std = preprocessing.get("mean"), preprocessing.get("std")
    if not mean or not std:
        return None
    return (-torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(1, -1, 1, 1)


def attribution_grid(images: list[np.ndarray], attributions: torch.Tensor, captions: list[str], path: str | Path,
                     title: str = "") -> Path:
    """One row per example: the input, the attribution map (red: towards the predicted class, blue:
    against), and the input with the absolute attribution overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(max(n, 1), 3, figsize=(7.5, 2.5 * max(n, 1)), squeeze=False)
    ext = (0, 1, 1, 0)  # the input and its map share the axes whatever their resolutions (8x8 digits, 32x32 input)
    for r in range(n):
        img = np.asarray(images[r])
        img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
        a = attributions[r].float().numpy()
        lim = float(np.abs(a).max()) or 1.0
        grey = "gray" if img.ndim == 2 else None
        axes[r][0].imshow(img, cmap=grey, extent=ext, interpolation="nearest")
        axes[r][0].set_title(textwrap.fill(captions[r], 34), fontsize=7)
        axes[r][1].imshow(a, cmap="bwr", vmin=-lim, vmax=lim, extent=ext, interpolation="nearest")
        axes[r][1].set_title("attribution (red: for, blue: against)", fontsize=7)
        axes[r][2].imshow(img, cmap=grey, extent=ext, interpolation="nearest")
        axes[r][2].imshow(np.abs(a), cmap="inferno", alpha=0.55, extent=ext, interpolation="bilinear")
        axes[r][2].set_title("|attribution| over the input", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    if not n:
        axes[0][0].text(0.5, 0.5, "no examples", ha="center")
        for ax in axes[0]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985 if title else 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def thumbnails(groups: list[tuple[str, list[np.ndarray]]], path: str | Path, title: str = "") -> Path:
    """Rows of example images, one row per caption (the most confused class pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max([len(imgs) for _, imgs in groups] + [1])
    fig, axes = plt.subplots(max(len(groups), 1), cols, figsize=(1.8 * cols + 0.5, 1.9 * max(len(groups), 1)),
                             squeeze=False)
    for r, (caption, imgs) in enumerate(groups):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                img = np.asarray(imgs[c])
                img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r][0].set_title(caption, fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if title else 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


# -- text ------------------------------------------------------------------------------------------
def _word_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The first ``nn.Embedding`` of the backbone's first stage (the token embeddings)."""
    stage = model.backbone.stages[0]
    for m in stage.modules():
        if isinstance(m, torch.nn.Embedding):
            return m
    raise AutoftError("the text backbone's first stage has no token embedding layer to attribute to")


def text_attributions(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                      tokenizer, *, n_steps: int = 24) -> list[list[tuple[str, float]]]:
    """Per example, (token, attribution) for each real token, attributions normalised so that the
    largest absolute value is 1 (Layer Integrated Gradients on the token embeddings)."""
    ca = _captum()
    model = model.eval()
    layer = _word_embeddings(model)
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)

    def forward(input_ids, attention_mask):
        return model((input_ids, attention_mask))

    lig = ca.LayerIntegratedGradients(forward, layer)
    out = []
    for i in range(len(ids)):
        n = int(mask[i].sum())
        x, m = ids[i:i + 1, :n].long(), mask[i:i + 1, :n].long()
        base = torch.where(torch.isin(x, special), x, torch.full_like(x, pad)) if len(special) else \
            torch.full_like(x, pad)
        with torch.enable_grad():
            attr = lig.attribute(x, baselines=base, additional_forward_args=(m,), target=int(targets[i]),
                                 n_steps=n_steps, internal_batch_size=n_steps)
        a = attr.detach().sum(-1)[0].float()
        a = a / (a.abs().max().clamp_min(1e-12))
        tokens = tokenizer.convert_ids_to_tokens(x[0].tolist())
        out.append([(str(tok), float(v)) for tok, v in zip(tokens, a.tolist())])
    return out


def _token_span(token: str, score: float) -> str:
    text = token[2:] if token.startswith("##") else token
    colour = f"rgba(214,39,40,{abs(score):.2f})" if score >= 0 else f"rgba(31,119,180,{abs(score):.2f})"
    space = "" if token.startswith("##") else " "
    return (f'{space}<span class="tok" style="background:{colour}" title="{score:+.3f}">'
            f"{html.escape(text)}</span>")


def token_html(examples: list[dict]) -> str:
    """HTML (a fragment) of token attributions: one block per example with its caption; red = towards
    the predicted class, blue = against; every token and caption is escaped."""
    blocks = []
    for ex in examples:
        spans = "".join(_token_span(t, s) for t, s in ex["tokens"])
        blocks.append(f'<div class="ex {"ok" if ex.get("correct") else "bad"}"><div class="cap">'
                      f'{html.escape(ex["caption"])}</div><div class="toks">{spans}</div></div>')
    return "\n".join(blocks)


TOKEN_CSS = (".ex{margin:6px 0;padding:6px 8px;border-left:4px solid #2ca02c;background:#fafafa}"
             ".ex.bad{border-left-color:#d62728}.cap{font-size:12px;color:#444;margin-bottom:3px}"
             ".toks{font-family:monospace;font-size:13px;line-height:1.9}.tok{padding:1px 2px;border-radius:3px}")


def write_token_html(examples: list[dict], path: str | Path, title: str = "Token attributions") -> Path:
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>body{{font-family:sans-serif;max-width:1000px;margin:20px auto}}{TOKEN_CSS}</style></head>"
           f"<body><h2>{html.escape(title)}</h2><p>Layer Integrated Gradients on the token embeddings, for the "
           "predicted class: <span style='background:rgba(214,39,40,.6)'>red</span> pushes towards it, "
           "<span style='background:rgba(31,119,180,.6)'>blue</span> away from it.</p>"
           f"{token_html(examples)}</body></html>")
    Path(path).write_text(doc, encoding="utf-8")
    return Path(path)


def snippet(text: str, n: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
