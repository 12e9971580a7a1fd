"""Retrieval metrics and data-stage statistics on cases worked out by hand."""

from __future__ import annotations

import torch

from mmplatform.data import stages
from mmplatform.data.dataset import make_record, read_dataset, write_dataset
from mmplatform.evaluate.evaluate import ranks_from_similarity, retrieval_metrics


def test_ranks_and_recall_on_a_hand_made_similarity():
    # 3 images, 4 captions: captions 0,1 -> image 0; caption 2 -> image 1; caption 3 -> image 2.
    owner = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([
        [0.9, 0.1, 0.0],   # caption 0: own image first             -> t2i rank 0
        [0.2, 0.8, 0.1],   # caption 1: image 1 beats its own image -> t2i rank 1
        [0.1, 0.3, 0.7],   # caption 2: image 2 beats image 1       -> t2i rank 1
        [0.0, 0.1, 0.95],  # caption 3: own image first             -> t2i rank 0
    ])
    t2i, i2t = ranks_from_similarity(sim, owner)
    assert t2i.tolist() == [0, 1, 1, 0]
    # image 0: best own caption is caption 0 (0.9), nothing above it -> 0
    # image 1: own caption 2 scores 0.3, caption 1 scores 0.8 above it -> 1
    # image 2: own caption 3 scores 0.95, highest -> 0
    assert i2t.tolist() == [0, 1, 0]
    m = retrieval_metrics(t2i, i2t)
    assert m["t2i_recall@1"] == 0.5 and m["t2i_recall@5"] == 1.0
    assert abs(m["i2t_recall@1"] - 2 / 3) < 1e-6
    assert m["t2i_mean_rank"] == 1.5 and m["t2i_median_rank"] == 1.0


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_annotate_agreement_statistics(tmp_path):
    recs = [
        make_record(_png((255, 0, 0)), 8, 8, ["a red square", "a red square"]),   # Jaccard 1.0
        make_record(_png((0, 0, 255)), 8, 8, ["a blue square", "blue circle"]),   # {blue}/{a,blue,square,circle} = 0.25
        make_record(_png((0, 255, 0)), 8, 8, ["one caption only"]),               # no pair
    ]
    write_dataset(tmp_path / "in", recs, stage="test")
    stats = stages.annotate(tmp_path / "in", tmp_path / "out", tmp_path / "no_annotations")
    assert stats["read"] == stats["kept"] == 3 and stats["quarantined"] == 0
    assert abs(stats["caption_agreement_mean"] - (1.0 + 0.25) / 2) < 1e-9
    assert stats["caption_agreement_min"] == 0.25 and stats["low_agreement_images"] == 1
    assert len(read_dataset(tmp_path / "out")) == 3


def test_aro_metrics_count_each_foil_kind_and_stay_in_range():
    import torch

    from mmplatform.config import TrainParams
    from mmplatform.data.synthetic import generate_synthetic
    from mmplatform.evaluate.evaluate import aro_metrics
    from mmplatform.models.multimodal import MultimodalModel
    from mmplatform.models.tokenizer import train_tokenizer
    from mmplatform.train.batches import decode_images
    from mmplatform.train.objectives import model_config

    recs = [r for r in generate_synthetic(n_train=8, n_val=1, n_test=24, n_test_compositional=1)
            if r["split"] == "test"]
    tok = train_tokenizer([c for r in recs for c in r["captions"]], 256)
    torch.manual_seed(0)
    p = TrainParams.model_validate({"embed_dim": 16, "vision": {"hidden_size": 16, "layers": 1, "heads": 2},
                                    "text": {"hidden_size": 16, "layers": 1, "heads": 2},
                                    "decoder": {"hidden_size": 16, "layers": 1, "heads": 2}})
    model = MultimodalModel(model_config(p, tok, 64)).eval()
    m = aro_metrics(model, tok, recs, decode_images(recs, 64), batch=7)
    assert m["aro_order_n"] == 24  # every caption can be shuffled
    assert 0 < m["aro_attribution_n"] <= 24 and 0 < m["aro_relation_n"] <= 24
    for key in ("aro_attribution", "aro_relation", "aro_order"):
        assert 0.0 <= m[key] <= 1.0 and 0.0 <= m[f"{key}_itm"] <= 1.0
    # The same call twice gives the same figures (foils are seeded).
    assert aro_metrics(model, tok, recs, decode_images(recs, 64), batch=7) == m


def test_itm_rerank_reorders_only_the_top_k_by_the_matching_head():
    """A stand-in model whose ITM head knows the true pairs (it only checks the re-ranking arithmetic):
    a caption whose image is inside the contrastive top-k moves to rank 0; one whose image is outside
    keeps its contrastive rank (the head never sees it)."""
    from types import SimpleNamespace

    from mmplatform.evaluate.evaluate import itm_rerank
    from mmplatform.models.tokenizer import train_tokenizer

    names = ["alpha", "bravo", "charlie", "delta", "echo"]
    recs = [{"captions": [f"{n} picture"]} for n in names]
    tok = train_tokenizer([r["captions"][0] for r in recs] * 5, 64)
    word_id = {tok.convert_tokens_to_ids(n): i for i, n in enumerate(names)}
    images = torch.arange(5).view(5, 1, 1, 1).float()

    def itm_logits(img_tok, txt_tok, mask):
        img = img_tok[:, 0, 0].long()
        cap = torch.tensor([word_id[int(t)] for t in txt_tok[:, 1, 0].long()])
        return torch.stack([torch.zeros(len(img)), (img == cap).float() * 5], 1)

    model = SimpleNamespace(cfg=SimpleNamespace(max_length=8), itm_logits=itm_logits,
                            image_tokens=lambda x: x.view(len(x), 1, 1),
                            text_tokens=lambda ids, mask: ids.float()[:, :, None])
    owner = torch.arange(5)
    # Caption i's own image sits at contrastive rank i (i = 0..4): diagonal pushed down step by step.
    sim = torch.zeros(5, 5)
    for i in range(5):
        order = [j for j in range(5) if j != i]
        order.insert(i, i)
        for rank, j in enumerate(order):
            sim[i, j] = 1.0 - 0.1 * rank
    t2i_before, _ = ranks_from_similarity(sim, owner)
    assert t2i_before.tolist() == [0, 1, 2, 3, 4]
    s_t2i, s_i2t = itm_rerank(model, tok, recs, images, sim, k=3)
    t2i, _ = ranks_from_similarity(s_t2i, owner)
    assert t2i.tolist() == [0, 0, 0, 3, 4]  # top-3 rescued, the rest keep their rank
    # image->text: each column's top-3 captions are re-scored; where the own caption is among them it wins
    _, i2t = ranks_from_similarity(s_i2t, owner)
    top = sim.topk(3, dim=0).indices
    assert ((s_i2t >= 999).sum(0) == 3).all()
    for j in range(5):
        if j in top[:, j].tolist():
            assert i2t[j] == 0
