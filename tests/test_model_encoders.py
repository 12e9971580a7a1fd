"""The multimodal model on any Hugging Face encoder, chosen in params: small ConvNeXt / DistilBERT / RoBERTa
encoders saved to local folders and named by path (as a pretrained checkpoint would be) train, tune only what
their fine-tuning mode allows, use their own tokenizer and processor, and save / load offline; an uncached hub name
fails in one line; a model saved before the encoders were wrapped still loads with the same outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmplatform.config import TrainParams
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.models.encoders import (
    ConvStem,
    EncoderNotFoundError,
    sincos_positions,
    small_text_encoder,
    small_vision_encoder,
)
from mmplatform.models.multimodal import ModelConfig, MultimodalModel
from mmplatform.models.tokenizer import train_tokenizer
from mmplatform.train.batches import decode_images, tokenize_captions, tokenizer_texts
from mmplatform.train.objectives import make_tokenizer, model_config, multitask_loss, trim
from mmplatform.train.recipe import build_optimizer, optimizer_step, run_training

DATA_SIZE, ENC_SIZE = 48, 32  # the encoder's processor resizes the 48 px images to its own 32 px
TINY = {"embed_dim": 16, "batch_size": 8, "lr": 3e-3, "warmup_steps": 0,
        "decoder": {"hidden_size": 16, "layers": 1, "heads": 2}, "loss_weights": {"vqa": 0.0}}


def _params(vision: dict | None = None, text: dict | None = None) -> TrainParams:
    return TrainParams.model_validate(TINY | {"vision": vision or {}, "text": {"max_length": 24} | (text or {})})


@pytest.fixture(scope="module")
def recs():
    return [r for r in generate_synthetic(n_train=8, n_val=1, n_test=1, n_test_compositional=1,
                                          image_size=DATA_SIZE) if r["split"] == "train"][:8]


def _save_encoders(root: Path, recs: list[dict], text_kind: str) -> tuple[Path, Path]:
    """A ConvNeXt and a ``text_kind`` encoder with a tokenizer, saved as pretrained checkpoints are."""
    torch.manual_seed(1)
    vis = small_vision_encoder("convnext", image_size=ENC_SIZE, hidden=32, layers=2)
    tok = train_tokenizer(tokenizer_texts(recs), 128)
    txt = small_text_encoder(text_kind, vocab_size=len(tok), hidden=32, layers=2, max_length=24,
                             pad_id=tok.pad_token_id, tokenizer=tok)
    vis.save_pretrained(root / "vis")
    txt.save_pretrained(root / "txt")
    return root / "vis", root / "txt"


@pytest.mark.parametrize(("text_kind", "vision_ft", "text_ft"), [
    ("distilbert", "frozen", "partial"),
    ("roberta", "partial", "full"),
])
def test_local_pretrained_encoders_train_save_and_load_offline(recs, tmp_path, monkeypatch, text_kind,
                                                               vision_ft, text_ft):
    vis_dir, txt_dir = _save_encoders(tmp_path, recs, text_kind)
    p = _params({"name_or_path": str(vis_dir), "finetune": vision_ft, "trainable_layers": 1},
                {"name_or_path": str(txt_dir), "finetune": text_ft, "trainable_layers": 1})
    # the text model's own tokenizer (saved beside it), not one trained here with text.vocab_size
    tok = make_tokenizer(p, tokenizer_texts(recs))
    assert tok.get_vocab() == train_tokenizer(tokenizer_texts(recs), 128).get_vocab() and len(tok) != 512
    torch.manual_seed(0)
    model = MultimodalModel(model_config(p, tok, DATA_SIZE))
    weights = load_file(str(vis_dir / "model.safetensors"))
    for k, v in model.vision.model.state_dict().items():  # the saved weights were loaded, not re-initialised
        assert torch.equal(v, weights[k]), k
    assert model.vision.hidden_size == 32 and model.img_proj.in_features == 32

    images = decode_images(recs, DATA_SIZE)
    pixels = model.pixel_values(images)  # the encoder's processor: resized to its size, its mean / std
    assert pixels.shape[-2:] == (ENC_SIZE, ENC_SIZE) and torch.equal(pixels, model.vision.preprocess(images))

    caps = tokenize_captions(tok, recs, p.text.max_length)
    cap_idx = torch.tensor([r[0] for r in caps.per_image(len(recs))])
    ids, mask = trim(caps.ids[cap_idx], caps.mask[cap_idx])
    opt, sched = build_optimizer(model, p, 100)
    in_opt = {id(q) for g in opt.param_groups for q in g["params"]}
    assert in_opt == {id(q) for q in model.parameters() if q.requires_grad}  # frozen weights are not optimised
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(25):
        out = multitask_loss(model, images, ids, mask, p.loss_weights, gen)
        out["total"].backward()
        optimizer_step(model, opt, sched)
        losses.append(float(out["total"].detach()))
    assert losses[-1] < 0.85 * losses[0], losses

    def changed(prefix: str) -> bool:
        names = [n for n in before if n.startswith(prefix)]
        assert names, prefix
        return any(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in names)

    def unchanged(prefix: str) -> bool:
        names = [n for n in before if n.startswith(prefix)]
        assert names, prefix
        return all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in names)

    for head in ("img_proj.", "txt_proj.", "fusion.", "itm_head.", "decoder."):
        assert changed(head), head
    # ConvNeXt: stages 0..1; partial with trainable_layers=1 trains only the last stage and the final norm
    if vision_ft == "frozen":
        assert unchanged("vision.") and not model.vision.model.training  # frozen stays in eval mode
    else:
        assert unchanged("vision.model.embeddings.") and unchanged("vision.model.encoder.stages.0.")
        assert changed("vision.model.encoder.stages.1.") and changed("vision.model.layernorm.")
    layers = "text.model.transformer.layer." if text_kind == "distilbert" else "text.model.encoder.layer."
    if text_ft == "partial":
        assert unchanged("text.model.embeddings.") and unchanged(layers + "0.") and changed(layers + "1.")
    else:
        assert changed("text.model.embeddings.") and changed(layers + "0.")

    # saved, then loaded offline with the source folders gone: the encoder configs travel with the model
    model.eval()
    model.save(tmp_path / "model")
    assert (tmp_path / "model/vision_encoder/config.json").is_file()
    assert (tmp_path / "model/text_encoder/config.json").is_file()
    assert not (tmp_path / "model/vision_encoder/model.safetensors").exists()  # weights only in the model's file
    shutil.rmtree(vis_dir)
    shutil.rmtree(txt_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    back = MultimodalModel.load(tmp_path / "model")
    assert back.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(back.embed_images(images), model.embed_images(images))
        assert torch.equal(back.embed_texts(ids, mask), model.embed_texts(ids, mask))
        assert torch.equal(back.pixel_values(images), pixels)  # the processor came back too


def test_uncached_hub_name_offline_fails_in_one_line_through_the_train_stage(recs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    tok = train_tokenizer(tokenizer_texts(recs), 128)
    for section in ("vision", "text"):
        p = _params(**{section: {"name_or_path": "mmp-test-org/no-such-encoder"}})
        # the driver fails before it reads any data (the train dirs do not exist) or starts a worker
        with pytest.raises(EncoderNotFoundError) as err:
            run_training(p, train_dir=tmp_path / "none", val_dir=tmp_path / "none", out_dir=tmp_path / "out",
                         cache_dir=tmp_path / "cache")
        msg = str(err.value)
        assert "\n" not in msg and "local path" in msg and "mmp-test-org/no-such-encoder" in msg
        assert isinstance(err.value, ValueError)  # the stage entry point prints ValueErrors as one line
        with pytest.raises(EncoderNotFoundError, match="local path"):  # and so do the workers' model building
            MultimodalModel(model_config(p, tok, DATA_SIZE))
    with pytest.raises(EncoderNotFoundError, match="local path"):
        make_tokenizer(p, tokenizer_texts(recs))


def _old_layout(key: str) -> str:
    """A state-dict key as models saved before the encoder wrappers and the fusion's ``layers`` wrote it: bare
    ViTModel / BertModel attributes (``vision.embeddings...``), the single cross-attention block at the fusion's
    top level (``fusion.attn...``)."""
    for part in ("vision.", "text."):
        if key.startswith(part + "model."):
            key = part + key[len(part + "model."):]
    return key.replace("fusion.layers.0.", "fusion.", 1)


def test_default_model_is_unchanged_and_old_saved_models_load(tmp_path):
    """tests/data/old_model/model_config.json is what the code before the encoder options wrote (no encoder keys,
    no pooling, no fusion depth); its weights are written here in that version's key layout, and the model loads
    them into the wrapped encoders and the one-block fusion with the same embeddings."""
    from safetensors.torch import save_file, save_model

    raw = json.loads((Path(__file__).parent / "data" / "old_model" / "model_config.json").read_text())
    assert "vision_name_or_path" not in raw and "fusion_layers" not in raw and "pooling" not in raw
    torch.manual_seed(0)
    source = MultimodalModel(ModelConfig.from_dict(raw)).eval()
    save_model(source, str(tmp_path / "new.safetensors"))  # drops the decoder's tied copy, as save() does
    old = tmp_path / "old_model"
    old.mkdir()
    state = load_file(str(tmp_path / "new.safetensors"))
    save_file({_old_layout(k): v for k, v in state.items()}, str(old / "model.safetensors"))
    (old / "model_config.json").write_text(json.dumps(raw))
    assert any(k.startswith("vision.embeddings.") for k in load_file(str(old / "model.safetensors")))
    model = MultimodalModel.load(old)
    assert sum(q.numel() for q in model.parameters()) == sum(q.numel() for q in source.parameters())
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    mask = (ids != 0).long()
    assert torch.equal(model.embed_images(images), source.embed_images(images))
    assert torch.equal(model.embed_texts(ids, mask), source.embed_texts(ids, mask))
    with torch.no_grad():
        img_tok, txt_tok = model.image_tokens(images), model.text_tokens(ids, mask)
        assert torch.equal(model.itm_logits(img_tok, txt_tok, mask),
                           source.itm_logits(source.image_tokens(images), source.text_tokens(ids, mask), mask))
    # the default encoders are the same modules as before, wrapped: fixed 0.5/0.5 pixels, [CLS] pooling
    cfg = ModelConfig(**raw)
    assert cfg.vision_arch == "vit" and cfg.text_arch == "bert" and cfg.vision_name_or_path is None
    assert cfg.pooling == "cls" and cfg.fusion_layers is None and len(model.fusion.layers) == 1
    assert torch.equal(model.pixel_values(images), (images.float() / 255.0 - 0.5) / 0.5)
    # and a model saved now loads back with the wrapped key names (vision.model.*)
    assert any(k.startswith("vision.model.") for k in model.state_dict())


@pytest.mark.parametrize(("vision_arch", "text_arch"), [("convnext", "distilbert"), ("vit", "roberta")])
def test_small_encoder_archs_from_params_roundtrip(recs, tmp_path, vision_arch, text_arch):
    """Without name_or_path, vision.arch / text.arch pick the small builders; nothing extra is saved."""
    p = _params({"arch": vision_arch, "hidden_size": 16, "layers": 2, "heads": 2},
                {"arch": text_arch, "hidden_size": 16, "layers": 1, "heads": 2})
    tok = make_tokenizer(p, tokenizer_texts(recs))
    torch.manual_seed(0)
    model = MultimodalModel(model_config(p, tok, DATA_SIZE)).eval()
    assert model.vision.config.model_type == vision_arch and model.text.config.model_type == text_arch
    model.save(tmp_path / "m")
    assert not (tmp_path / "m/vision_encoder").exists() and not (tmp_path / "m/text_encoder").exists()
    back = MultimodalModel.load(tmp_path / "m")
    images = decode_images(recs[:2], DATA_SIZE)
    with torch.no_grad():
        assert torch.equal(back.embed_images(images), model.embed_images(images))


def test_train_stage_runs_on_local_pretrained_encoders(tmp_path, monkeypatch):
    """run_training (Ray Train's local mode) with a frozen ConvNeXt and a partially tuned DistilBERT named by
    path: the saved model carries the text model's tokenizer and its encoders' configs, and loads offline."""
    from mmplatform.data.dataset import write_dataset
    from mmplatform.models.tokenizer import load_tokenizer

    records = generate_synthetic(n_train=32, n_val=8, n_test=1, n_test_compositional=1, image_size=DATA_SIZE)
    write_dataset(tmp_path / "data", records, stage="test")
    vis_dir, txt_dir = _save_encoders(tmp_path, [r for r in records if r["split"] == "train"], "distilbert")
    p = _params({"name_or_path": str(vis_dir), "finetune": "frozen"},
                {"name_or_path": str(txt_dir), "finetune": "partial", "trainable_layers": 1})
    p = p.model_copy(update={"epochs": 1, "batch_size": 16, "num_workers": 0, "cpus_per_worker": 1})
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        history = run_training(p, train_dir=tmp_path / "data", val_dir=tmp_path / "data", out_dir=tmp_path / "out",
                               cache_dir=tmp_path / "cache")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    assert len(history) == 1
    saved_tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert saved_tok.get_vocab() == load_tokenizer(txt_dir).get_vocab()
    frozen = load_file(str(vis_dir / "model.safetensors"))
    shutil.rmtree(vis_dir)
    shutil.rmtree(txt_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = MultimodalModel.load(tmp_path / "out")
    assert model.cfg.vision_finetune == "frozen" and model.cfg.text_finetune == "partial"
    for k, v in model.vision.model.state_dict().items():  # the frozen encoder left training as it came
        assert torch.equal(v, frozen[k]), k


def test_conv_stem_gives_the_patch_grid_and_saved_models_rebuild_it(tmp_path):
    stem = ConvStem(3, 32, 16)
    assert stem(torch.zeros(2, 3, 64, 64)).shape == (2, 32, 4, 4)  # the grid a 16 x 16 patch projection gives
    assert [m.stride for m in stem if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 4
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(3, 32, 12)
    cfg = ModelConfig(vocab_size=40, pad_id=0, bos_id=1, eos_id=2, image_size=32, patch_size=8, vision_hidden=16,
                      vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1, text_heads=2, max_length=8,
                      decoder_hidden=16, decoder_layers=1, decoder_heads=2, embed_dim=16, vision_stem="conv",
                      vision_position_init="sincos")
    model = MultimodalModel(cfg).eval()
    assert isinstance(model.vision.model.embeddings.patch_embeddings.projection, ConvStem)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    model.save(tmp_path / "m")
    loaded = MultimodalModel.load(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(loaded.image_tokens(images), model.image_tokens(images))


def test_sincos_positions_known_values():
    pos = sincos_positions(3, 8)  # 9 cells; channels: sin(col), cos(col), sin(row), cos(row) at 2 frequencies
    assert pos.shape == (9, 8)
    assert torch.allclose(pos[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))  # (row 0, col 0)
    # cell 5 = row 1, col 2: frequencies 1 and 1/100
    col, row = torch.tensor([2.0, 0.02]), torch.tensor([1.0, 0.01])
    assert torch.allclose(pos[5], torch.cat([col.sin(), col.cos(), row.sin(), row.cos()]), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_positions(3, 6)


def test_default_vit_position_init_sincos_sets_the_grid_and_random_keeps_the_old_init():
    base = dict(vocab_size=40, pad_id=0, bos_id=1, eos_id=2, image_size=32, patch_size=8, vision_hidden=16,
                vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1, text_heads=2, max_length=8,
                decoder_hidden=16, decoder_layers=1, decoder_heads=2, embed_dim=16)
    torch.manual_seed(0)
    sincos = MultimodalModel(ModelConfig(**base, vision_position_init="sincos"))
    torch.manual_seed(0)
    old = MultimodalModel(ModelConfig(**base))
    pe = sincos.vision.model.embeddings.position_embeddings[0]
    assert torch.equal(pe[1:], sincos_positions(4, 16))
    assert not torch.equal(old.vision.model.embeddings.position_embeddings[0, 1:], pe[1:])
