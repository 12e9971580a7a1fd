"""Early stopping in the train stage: it stops where the monitored val loss stopped improving, keeps the best
epoch's weights, and says so (the RL gain is judged against a model trained to its plateau)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mmplatform.config import TrainParams
from mmplatform.data.dataset import write_dataset
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import load_tokenizer
from mmplatform.train.batches import decode_images, tokenize_captions
from mmplatform.train.objectives import multitask_loss, trim
from mmplatform.train.recipe import plateau_reached, run_training, training_summary

# Watched: the contrastive loss on a val set whose captions belong to other images (rotated by one), which
# rises once the model learns to match images with their own captions, so the run certainly turns. ITM is off:
# at this learning rate its gradients through the two-block fusion kept the contrastive loss at ln(B) for all 30
# epochs, and then nothing turns.
TINY = {"epochs": 30, "batch_size": 32, "embed_dim": 32, "warmup_steps": 0, "lr": 1e-2, "num_workers": 0,
        "cpus_per_worker": 1, "loss_weights": {"vqa": 0.0, "itm": 0.0}, "early_stopping_metric": "val_contrastive",
        "vision": {"hidden_size": 32, "layers": 1, "heads": 2},
        "text": {"hidden_size": 32, "layers": 1, "heads": 2},
        "decoder": {"hidden_size": 32, "layers": 1, "heads": 2}}
PATIENCE = 2


def _rows(values: list[float]) -> list[dict]:
    return [{"epoch": e, "val_total": v} for e, v in enumerate(values)]


def test_plateau_and_summary_on_known_histories():
    p = TrainParams.model_validate({"early_stopping_patience": 2, "epochs": 9})
    hist = _rows([3.0, 2.0, 2.5, 2.1])  # best at epoch 1, two epochs without improvement since
    assert plateau_reached(hist, {"epoch": 1}, p) and not plateau_reached(hist[:3], {"epoch": 1}, p)
    s = training_summary(hist, p)
    assert (s["best_epoch"], s["best_value"], s["epochs_run"], s["plateau"]) == (1, 2.0, 4, True)
    assert training_summary(_rows([3.0, 2.0, 1.5]), p)["plateau"] is False  # still improving at the end
    off = p.model_copy(update={"early_stopping_patience": 0})
    assert not plateau_reached(hist, {"epoch": 1}, off) and training_summary(hist, off)["weights"] == "last"


def test_summary_records_each_val_loss_plateau():
    """The run monitors val_total; each objective's own plateau is recorded beside it (known values)."""
    p = TrainParams.model_validate({"early_stopping_patience": 3, "epochs": 9})
    cap = [2.0, 1.0, 0.9, 0.95, 0.92, 0.91]   # best at epoch 2, then 3 epochs without a new minimum
    vqa = [3.0, 2.0, 1.5, 1.2, 1.0, 0.8]      # still improving
    hist = [{"epoch": e, "val_total": c + v, "val_captioning": c, "val_vqa": v, "val_t2i_recall@1": 0.5}
            for e, (c, v) in enumerate(zip(cap, vqa, strict=True))]
    losses = training_summary(hist, p)["val_losses"]
    assert set(losses) == {"val_captioning", "val_vqa"}
    assert losses["val_captioning"] == {"best_epoch": 2, "best_value": 0.9, "plateau": True}
    assert losses["val_vqa"] == {"best_epoch": 5, "best_value": 0.8, "plateau": False}
    assert training_summary(hist[:5], p)["val_losses"]["val_captioning"]["plateau"] is False  # 2 epochs since


def test_monitoring_a_loss_that_is_switched_off_is_refused():
    with pytest.raises(ValidationError, match="loss_weights.vqa is 0"):
        TrainParams.model_validate({"early_stopping_metric": "val_vqa", "loss_weights": {"vqa": 0.0}})


def test_training_stops_at_the_plateau_and_keeps_the_best_epoch(tmp_path):
    from mmplatform.data.dataset import read_dataset

    records = generate_synthetic(n_train=64, n_val=32, n_test=1, n_test_compositional=1)
    val = [r for r in records if r["split"] == "val"]
    captions = [r["captions"] for r in val]
    for i, r in enumerate(val):
        r["captions"] = captions[(i + 1) % len(val)]
    data = tmp_path / "data"
    write_dataset(data, records, stage="test")

    def train(patience: int, name: str) -> list[dict]:
        p = TrainParams.model_validate(TINY | {"early_stopping_patience": patience})
        return run_training(p, train_dir=data, val_dir=data, out_dir=tmp_path / name, cache_dir=tmp_path / "c")

    full = train(0, "full")  # every epoch, and the last weights
    values = [r["val_contrastive"] for r in full]
    assert len(values) == TINY["epochs"] and values[-1] > min(values), values
    # where PATIENCE epochs without a new minimum first occur
    stop = next(e for e in range(len(values)) if e - min(range(e + 1), key=values.__getitem__) >= PATIENCE)
    best = min(range(stop + 1), key=values.__getitem__)

    stopped = train(PATIENCE, "stopped")  # same seed: the same epochs, bit for bit, until it stops
    assert [r["val_contrastive"] for r in stopped] == values[:stop + 1]
    summary = training_summary(stopped, TrainParams.model_validate(TINY | {"early_stopping_patience": PATIENCE}))
    assert (summary["best_epoch"], summary["plateau"], summary["epochs_run"]) == (best, True, stop + 1)

    # the saved weights are the best epoch's: their val loss is the one recorded for it, not the last epoch's
    model = MultimodalModel.load(tmp_path / "stopped").eval()
    tok = load_tokenizer(tmp_path / "stopped" / "tokenizer")
    val = read_dataset(data, split="val")
    caps = tokenize_captions(tok, val, model.cfg.max_length)
    first = torch.tensor([r[0] for r in caps.per_image(len(val))])
    ids, mask = trim(caps.ids[first], caps.mask[first])
    with torch.no_grad():
        out = multitask_loss(model, decode_images(val, model.cfg.image_size), ids, mask,
                             TrainParams.model_validate(TINY).loss_weights, torch.Generator().manual_seed(0))
    assert float(out["contrastive"]) == pytest.approx(values[best], abs=1e-5)


def test_the_epoch_line_says_where_the_run_is_how_fast_and_when_it_ends():
    from mmplatform.train.recipe import progress_line

    p = TrainParams.model_validate(TINY | {"epochs": 60, "early_stopping_metric": "val_total"})
    history = [{"epoch": 0, "seconds": 100.0, "train_total": 3.5, "val_total": 3.0},
               {"epoch": 1, "seconds": 90.0, "train_total": 3.0, "val_total": 3.2}]
    line = progress_line(history, p, 9500, {"epoch": 0, "value": 3.0})
    # 58 epochs left at the mean 95 s: 5,510 s = 1 h 31 min; the epoch was not the best one.
    assert line == ("epoch 2/60: 90 s, 106 samples/s, ETA 1 h 31 min; train_total 3.0000, val_total 3.2000, "
                    "best 3.0000 at epoch 1")
    first = progress_line(history[:1], p, 9500, {"epoch": -1, "value": float("inf")})
    assert first.startswith("epoch 1/60: 100 s, 95 samples/s, ETA 1 h 38 min;") and "best" not in first
