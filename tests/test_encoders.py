"""Unimodal encoders: save → load by local path gives identical tokens; token layouts; fine-tuning modes; the
one-line refusals (uncached hub name offline, pickle-only folder)."""

from __future__ import annotations

import json

import pytest
import torch

from mmplatform.models.encoders import (
    TEXT_KINDS,
    VISION_KINDS,
    EncoderNotFoundError,
    VisionEncoder,
    find_layer_list,
    load_text_encoder,
    load_vision_encoder,
    small_text_encoder,
    small_vision_encoder,
    text_encoder_from_config,
    vision_encoder_from_config,
)
from mmplatform.models.tokenizer import train_tokenizer

SIZE, HIDDEN = 32, 32


def _images(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_vision_roundtrip_tokens_and_summary(kind, tmp_path):
    torch.manual_seed(0)
    enc = small_vision_encoder(kind, image_size=SIZE, hidden=HIDDEN, layers=2).eval()
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    back = load_vision_encoder(tmp_path).eval()
    x = enc.preprocess(_images())
    with torch.no_grad():
        tokens = enc.tokens(x)
        assert torch.equal(back.tokens(back.preprocess(_images())), tokens)
        out = enc.model(pixel_values=x)
    # 32 px / patch 8 → 16 patches + [CLS]; ConvNeXt: 32 / 4 (stem) / 2 (stage 2) → 4×4 map + pooled vector
    assert tokens.shape == (2, 17, HIDDEN) and back.hidden_size == HIDDEN
    if kind in ("clip", "convnext"):  # the summary token is the model's own pooled vector
        assert torch.allclose(tokens[:, 0], out.pooler_output.flatten(1), atol=1e-6)
    else:
        assert torch.equal(tokens[:, 0], out.last_hidden_state[:, 0])
    if kind == "convnext":  # the spatial tokens are the flattened feature map, through the final norm
        fmap = out.last_hidden_state.flatten(2).transpose(1, 2)
        assert torch.allclose(tokens[:, 1:], enc.model.layernorm(fmap), atol=1e-6)


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_text_roundtrip_with_tokenizer(kind, tmp_path):
    tok = train_tokenizer(["a red circle left of a blue square", "two green triangles"], 64)
    torch.manual_seed(0)
    enc = small_text_encoder(kind, vocab_size=len(tok), hidden=HIDDEN, layers=2, max_length=16,
                             pad_id=tok.pad_token_id, tokenizer=tok).eval()
    enc.save_pretrained(tmp_path)
    back = load_text_encoder(tmp_path).eval()
    batch = back.tokenizer(["a red circle", "two green triangles left"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.cls_token_id  # the saved tokenizer came back, [CLS] first
    with torch.no_grad():
        tokens = enc.tokens(batch["input_ids"], batch["attention_mask"])
        assert torch.equal(back.tokens(batch["input_ids"], batch["attention_mask"]), tokens)
    assert tokens.shape == (2, batch["input_ids"].shape[1], HIDDEN) and back.hidden_size == HIDDEN


def test_preprocess_uses_processor_size_mean_std():
    from transformers import CLIPImageProcessorPil

    enc = small_vision_encoder("vit", image_size=SIZE, hidden=HIDDEN)
    white = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    assert enc.preprocess(white).shape == (1, 3, SIZE, SIZE)  # resized to the processor's size
    assert torch.allclose(enc.preprocess(white), torch.ones(1))  # (1 - 0.5) / 0.5
    assert torch.allclose(enc.preprocess(torch.zeros_like(white)), -torch.ones(1))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    clip = VisionEncoder(small_vision_encoder("clip", image_size=SIZE, hidden=HIDDEN).model,
                         CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}))
    wide = torch.full((1, 3, SIZE, 2 * SIZE), 255, dtype=torch.uint8)
    got = clip.preprocess(wide)  # shortest edge → SIZE, then centre crop SIZE × SIZE
    assert got.shape == (1, 3, SIZE, SIZE)
    want = torch.tensor([(1 - m) / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1)
    assert torch.allclose(got, want.expand_as(got), atol=1e-4)


def _train_steps(enc, inputs, steps: int = 3) -> list[float]:
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(enc.hidden_size, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(steps):
        loss = (enc.tokens(*inputs)[:, 0] - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["vit", "convnext", "clip", "distilbert"])
def test_finetune_modes(kind):
    def build(finetune):
        torch.manual_seed(0)
        if kind in TEXT_KINDS:
            return small_text_encoder(kind, vocab_size=40, hidden=HIDDEN, layers=3, max_length=16,
                                      finetune=finetune, trainable_layers=1)
        return small_vision_encoder(kind, image_size=SIZE, hidden=HIDDEN, layers=3, finetune=finetune,
                                    trainable_layers=1)

    if kind in TEXT_KINDS:
        ids = torch.randint(5, 40, (2, 8), generator=torch.Generator().manual_seed(3))
        inputs = (ids, torch.ones_like(ids))
    else:
        inputs = (build("full").preprocess(_images()),)

    full, partial, frozen = build("full"), build("partial"), build("frozen")
    assert frozen.num_trainable() == 0 and 0 < partial.num_trainable() < full.num_trainable()
    frozen.train()
    assert not frozen.model.training  # a frozen encoder stays in eval mode inside a training parent

    # full: every trainable parameter is on the token path (DDP needs no unused parameters)
    full.tokens(*inputs)[:, 0].sum().backward()
    assert [n for n, p in full.named_parameters() if p.requires_grad and p.grad is None] == []

    # partial: a few optimiser steps lower the loss and change exactly the last block and the final norms
    layer_name, _ = find_layer_list(partial.model)
    n_layers = len(find_layer_list(partial.model)[1])
    last = f"model.{layer_name}.{n_layers - 1}."
    before = {n: p.detach().clone() for n, p in partial.named_parameters()}
    losses = _train_steps(partial, inputs)
    assert losses[-1] < losses[0]
    changed = {n for n, p in partial.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(last) or "norm" in n.split(".")[1] for n in changed), changed
    assert any(n.startswith(last) for n in changed)
    assert not any(n.startswith(f"model.{layer_name}.0.") or ".embeddings." in f".{n}" for n in changed)


def test_uncached_hub_name_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load, what in ((load_vision_encoder, "vision encoder"), (load_text_encoder, "text encoder")):
        with pytest.raises(EncoderNotFoundError) as info:
            load("mmplatform-tests/not-a-cached-model")
        msg = str(info.value)
        assert isinstance(info.value, ValueError) and "\n" not in msg
        assert msg.startswith(f"{what} 'mmplatform-tests/not-a-cached-model': not found locally")
        assert "give a local path" in msg


def test_pickle_only_folder_and_missing_folder_are_refused(tmp_path):
    enc = small_vision_encoder("vit", image_size=SIZE, hidden=HIDDEN)
    enc.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(enc.model.state_dict(), tmp_path / "pytorch_model.bin")  # what old checkpoints ship
    with pytest.raises(EncoderNotFoundError, match="pickle") as info:
        load_vision_encoder(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(EncoderNotFoundError, match="no such folder"):
        load_text_encoder(tmp_path / "missing" / "model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(EncoderNotFoundError, match="no model.safetensors"):
        load_vision_encoder(tmp_path)


def test_dual_encoder_checkpoint_gives_its_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tiny = {"hidden_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    clip = CLIPModel(CLIPConfig(text_config=tiny | {"vocab_size": 50},
                                vision_config=tiny | {"image_size": SIZE, "patch_size": 8}, projection_dim=16))
    clip.save_pretrained(tmp_path)
    enc = load_vision_encoder(tmp_path, finetune="frozen").eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(enc.tokens(x)[:, 0], clip.vision_model(pixel_values=x).pooler_output, atol=1e-6)
    assert enc.hidden_size == HIDDEN and enc.num_trainable() == 0


@pytest.mark.parametrize("kind", ["clip", "convnext", "roberta"])
def test_config_skeleton_takes_a_parent_state_dict(kind, tmp_path):
    """How a parent model saves an encoder: config (+ processor) beside its own safetensors, weights elsewhere."""
    torch.manual_seed(0)
    if kind in TEXT_KINDS:
        enc = small_text_encoder(kind, vocab_size=40, hidden=HIDDEN, max_length=16).eval()
        enc.save_config(tmp_path)
        back = text_encoder_from_config(tmp_path).eval()
        ids = torch.randint(5, 40, (2, 8), generator=torch.Generator().manual_seed(3))
        inputs = (ids, torch.ones_like(ids))
    else:
        enc = small_vision_encoder(kind, image_size=SIZE, hidden=HIDDEN).eval()
        enc.save_config(tmp_path)
        back = vision_encoder_from_config(tmp_path).eval()
        assert back.image_size == (SIZE, SIZE) and back.processor is not None
        inputs = (enc.preprocess(_images()),)
    assert not (tmp_path / "model.safetensors").exists()
    with torch.no_grad():
        assert not torch.allclose(back.tokens(*inputs), enc.tokens(*inputs))  # fresh weights differ
        back.load_state_dict(enc.state_dict())  # same keys: strict load
        assert torch.equal(back.tokens(*inputs), enc.tokens(*inputs))
