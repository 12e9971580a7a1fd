"""Every fusion kind: shapes, padding invariance, tokens it reads, compute formula, and a tiny ITM task it learns."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmplatform.models.fusion import FUSION_KINDS, FUSIONS, GatedFusion, build_fusion, fusion_flops
from mmplatform.models.multimodal import ModelConfig, MultimodalModel

DV, DT, DIM = 24, 40, 32  # deliberately different widths: a wrong projection fails on shapes
READS_IMAGE_PATCHES = {"cross_attention", "multimodal_transformer"}
READS_TEXT_TOKENS = {"cross_attention", "multimodal_transformer"}  # beyond the text [CLS]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _inputs(b: int = 4, ni: int = 9, nt: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    img = torch.randn(b, ni, DV)
    txt = torch.randn(b, nt, DT)
    lengths = torch.tensor([nt, 1, 3, 5][:b])  # one full row, one [CLS]-only row
    mask = (torch.arange(nt)[None] < lengths[:, None]).long()
    return img, txt, mask


def test_kinds_registry():
    assert FUSION_KINDS == ("concat", "gated", "cross_attention", "multimodal_transformer")
    assert set(FUSIONS) == set(FUSION_KINDS)
    with pytest.raises(ValueError, match="multimodal_transformer"):
        build_fusion("bilinear", DV, DT, DIM)
    with pytest.raises(ValueError):
        fusion_flops("bilinear", 4, 4, 8)
    with pytest.raises(ValueError, match="divisible"):
        build_fusion("multimodal_transformer", DV, DT, 30, heads=4)


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_output_shape(kind):
    f = build_fusion(kind, DV, DT, DIM)
    img, txt, mask = _inputs()
    out = f(img, txt, mask)
    assert f.out_dim == DIM
    assert out.shape == (4, DIM)
    assert torch.isfinite(out).all()


def test_constructor_args_reach_the_multimodal_transformer():
    f = build_fusion("multimodal_transformer", DV, DT, DIM, layers=1, heads=2)
    assert len(f.encoder.layers) == 1 and f.encoder.layers[0].self_attn.num_heads == 2
    assert len(build_fusion("multimodal_transformer", DV, DT, DIM).encoder.layers) == 2


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_padding_invariance(kind, train):
    """Whatever sits at padded text positions cannot change the fused vector (train and inference paths)."""
    f = build_fusion(kind, DV, DT, DIM).train(train)
    img, txt, mask = _inputs()
    garbage = txt.clone()
    pad = mask == 0
    garbage[pad] = 100 * torch.randn(int(pad.sum()), DT)
    with torch.no_grad():
        a, b = f(img, txt, mask), f(img, garbage, mask)
    assert not torch.equal(txt, garbage)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # bool masks are accepted too
    with torch.no_grad():
        assert torch.allclose(f(img, txt, mask.bool()), a, atol=1e-6)


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_which_tokens_each_kind_reads(kind):
    """The documented contract: [CLS]s always matter; patches and the other real text tokens only for the
    attention kinds (cross-attention's text self-attention; test_cross_attention_blocks_let_words_see_each_other
    covers the older single block, which reads the [CLS] query alone)."""
    f = build_fusion(kind, DV, DT, DIM).eval()
    img, txt, mask = _inputs()
    mask = torch.ones_like(mask)

    def changed(i2: torch.Tensor, t2: torch.Tensor) -> bool:
        with torch.no_grad():
            return not torch.allclose(f(img, txt, mask), f(i2, t2, mask), atol=1e-5)

    def bump(x: torch.Tensor, sl: slice) -> torch.Tensor:
        y = x.clone()
        y[:, sl] += torch.randn_like(y[:, sl])
        return y

    assert changed(bump(img, slice(0, 1)), txt)
    assert changed(img, bump(txt, slice(0, 1)))
    assert changed(bump(img, slice(1, None)), txt) == (kind in READS_IMAGE_PATCHES)
    assert changed(img, bump(txt, slice(1, None))) == (kind in READS_TEXT_TOKENS)


def test_gated_fusion_is_a_gated_sum():
    """h = z * tanh(W_v v) + (1 - z) * tanh(W_t t); a saturated gate picks one modality."""
    f = GatedFusion(DV, DT, DIM)
    img, txt, mask = _inputs()
    with torch.no_grad():
        z = f.gate_values(img, txt)
        h_img, h_txt = torch.tanh(f.img(img[:, 0])), torch.tanh(f.txt(txt[:, 0]))
        assert ((z > 0) & (z < 1)).all()
        assert torch.allclose(f(img, txt, mask), z * h_img + (1 - z) * h_txt, atol=1e-6)
        f.gate.weight.zero_()
        f.gate.bias.fill_(50.0)
        assert torch.allclose(f(img, txt, mask), h_img, atol=1e-6)
        f.gate.bias.fill_(-50.0)
        assert torch.allclose(f(img, txt, mask), h_txt, atol=1e-6)


def test_fusion_flops_hand_values():
    # concat: (4+4)*4 + 4*4 = 48; gated: 2*(4+4)*4 = 64
    assert fusion_flops("concat", 10, 10, 4) == 48
    assert fusion_flops("gated", 10, 10, 4) == 64
    # cross_attention, ni=nt=2, d=2, one block without self-attention:
    # 2*2*2 + 2*2*2 + 2*4 + 2*2*4 + 2*2*2*2 + 9*2*4 = 8+8+8+16+16+72 = 128
    assert fusion_flops("cross_attention", 2, 2, 2, layers=1, self_attention=False) == 128
    # two blocks with self-attention: 16 + 2 * (112 + 4*2*4 + 2*4*2) = 16 + 2 * 160 = 336
    assert fusion_flops("cross_attention", 2, 2, 2) == 336
    # multimodal_transformer, ni=nt=1, d=2, 1 layer: n=3; 1*2*2 + 1*2*2 + 12*3*4 + 2*9*2 = 8 + 144 + 36 = 188
    assert fusion_flops("multimodal_transformer", 1, 1, 2, layers=1) == 188
    # the ordering a fusion study expects at our default sizes (64 patches + [CLS], 20 text tokens, d=128)
    c = {k: fusion_flops(k, 65, 20, 128) for k in FUSION_KINDS}
    assert c["concat"] < c["gated"] < c["cross_attention"] < c["multimodal_transformer"]


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_fusion_flops_match_counted_matmuls(kind):
    """The formula equals what torch's FLOP counter sees (x2), with the math attention kernel so the attention
    products are visible to it."""
    ni, nt = 9, 7
    f = build_fusion(kind, DV, DT, DIM).train()  # train mode: the eval fast path hides its matmuls from the counter
    img, txt, mask = _inputs(b=1, ni=ni, nt=nt)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        f(img, txt, mask)
    assert counter.get_total_flops() == 2 * fusion_flops(kind, ni, nt, DIM, vision_dim=DV, text_dim=DT)


def _itm_task(n: int, gen: torch.Generator, ni: int = 5, nt: int = 6, code_dim: int = 8):
    """Pairs whose label is 1 when image and text tokens were generated from the same random code."""
    mix_img = torch.randn(ni, code_dim, DV, generator=gen) / code_dim**0.5
    mix_txt = torch.randn(nt, code_dim, DT, generator=gen) / code_dim**0.5
    codes = torch.randn(n, code_dim, generator=gen)
    label = (torch.arange(n) % 2 == 0).float()
    other = torch.randn(n, code_dim, generator=gen)
    txt_codes = torch.where(label[:, None] == 1, codes, other)
    img = torch.einsum("bc,icd->bid", codes, mix_img) + 0.1 * torch.randn(n, ni, DV, generator=gen)
    txt = torch.einsum("bc,jcd->bjd", txt_codes, mix_txt) + 0.1 * torch.randn(n, nt, DT, generator=gen)
    lengths = torch.randint(2, nt + 1, (n,), generator=gen)
    mask = (torch.arange(nt)[None] < lengths[:, None]).long()
    txt[mask == 0] = 3 * torch.randn(int((mask == 0).sum()), DT, generator=gen)  # padding is garbage
    return img, txt, mask, label


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_tiny_itm_training_lowers_loss_and_changes_weights(kind):
    gen = torch.Generator().manual_seed(0)
    img, txt, mask, label = _itm_task(64, gen)
    fusion = build_fusion(kind, DV, DT, DIM)
    head = torch.nn.Linear(fusion.out_dim, 1)
    before = {n: p.detach().clone() for n, p in fusion.named_parameters()}
    opt = torch.optim.Adam([*fusion.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(fusion(img, txt, mask)).squeeze(1), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    unchanged = [n for n, p in fusion.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"{kind}: parameters that never moved: {unchanged}"


def test_existing_kinds_keep_their_parameter_names():
    """Saved models must still load: the state-dict keys of the original kinds are frozen."""
    assert sorted(build_fusion("concat", DV, DT, DIM).state_dict()) == [
        "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]


def test_single_block_cross_attention_of_older_models_loads_and_computes_the_same():
    """Models saved before ``layers`` had one cross-attention block at the top level (attn, norm1, ff, norm2)
    and no text self-attention; their weights load into ``layers=1, self_attention=False`` and compute the
    original block: q/kv projections, cross-attention + norm, feed-forward + norm, read at [CLS]."""
    torch.manual_seed(0)
    old = {"q": torch.nn.Linear(DT, DIM), "kv": torch.nn.Linear(DV, DIM),
           "attn": torch.nn.MultiheadAttention(DIM, 4, batch_first=True), "norm1": torch.nn.LayerNorm(DIM),
           "ff": torch.nn.Sequential(torch.nn.Linear(DIM, 4 * DIM), torch.nn.GELU(), torch.nn.Linear(4 * DIM, DIM)),
           "norm2": torch.nn.LayerNorm(DIM)}
    for m in (old["norm1"], old["norm2"]):  # non-trivial norms, so a dropped norm would show
        torch.nn.init.normal_(m.weight)
        torch.nn.init.normal_(m.bias)
    state = {f"{name}.{k}": v for name, m in old.items() for k, v in m.state_dict().items()}
    f = build_fusion("cross_attention", DV, DT, DIM, layers=1, self_attention=False).eval()
    f.load_state_dict(state)  # strict: every old key is used and nothing is missing
    img, txt, mask = _inputs(b=3)
    with torch.no_grad():
        q, kv = old["q"](txt), old["kv"](img)
        h = old["norm1"](q + old["attn"](q, kv, kv, need_weights=False)[0])
        expected = old["norm2"](h + old["ff"](h))[:, 0]
        assert torch.allclose(f(img, txt, mask), expected, atol=1e-5)
    assert not any("self_attn" in k for k in f.state_dict())


def test_cross_attention_blocks_let_words_see_each_other():
    """With text self-attention (the default), the [CLS] read-out depends on the other text tokens; with one
    block and none it cannot (the query is the [CLS] alone)."""
    img, txt, mask = _inputs(b=1, nt=5)
    txt2 = txt.clone()
    txt2[:, 3] += 1.0
    for kw, depends in (({}, True), ({"layers": 1, "self_attention": False}, False)):
        f = build_fusion("cross_attention", DV, DT, DIM, **kw).eval()
        with torch.no_grad():
            changed = not torch.allclose(f(img, txt, mask), f(img, txt2, mask), atol=1e-6)
        assert changed == depends, kw
    assert len(build_fusion("cross_attention", DV, DT, DIM).layers) == 2
    with pytest.raises(ValueError, match="layers"):
        build_fusion("cross_attention", DV, DT, DIM, layers=0)


@pytest.mark.parametrize("kind", ["gated", "multimodal_transformer"])
def test_multimodal_model_builds_and_roundtrips_with_new_kinds(kind, tmp_path):
    cfg = ModelConfig(vocab_size=40, pad_id=0, bos_id=1, eos_id=2, image_size=16, patch_size=8, vision_hidden=16,
                      vision_layers=1, vision_heads=2, text_hidden=24, text_layers=1, text_heads=2, max_length=8,
                      decoder_hidden=16, decoder_layers=1, decoder_heads=2, embed_dim=16, fusion=kind)
    model = MultimodalModel(cfg).eval()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    ids = torch.randint(3, 40, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        logits = model.itm_logits(model.image_tokens(images), model.text_tokens(ids, mask), mask)
    assert logits.shape == (2, 2)
    model.save(tmp_path / "m")
    loaded = MultimodalModel.load(tmp_path / "m").eval()
    with torch.no_grad():
        again = loaded.itm_logits(loaded.image_tokens(images), loaded.text_tokens(ids, mask), mask)
    assert torch.allclose(again, logits, atol=1e-6)


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_img_index_equals_indexing_first_and_gives_the_same_gradients(kind):
    """Each image once plus ``img_index`` (what training passes: ITM's and VQA's pairs share images) must be the
    same function as one image row per pair, values and gradients."""
    f = build_fusion(kind, DV, DT, DIM)
    img, txt, mask = _inputs(b=4)
    index = torch.tensor([2, 0, 2, 1])  # image 3 unused, image 2 twice
    per_image = img.clone().requires_grad_()
    per_pair = img.clone().requires_grad_()
    a = f(per_pair[index], txt, mask)
    b = f(per_image, txt, mask, index)
    assert torch.allclose(a, b, atol=1e-6)
    grad = torch.randn_like(a)
    a.backward(grad)
    b.backward(grad)
    assert torch.allclose(per_pair.grad, per_image.grad, atol=1e-5)
    assert per_image.grad[3].abs().sum() == 0  # an image no pair reads gets no gradient


def test_model_itm_and_vqa_logits_take_img_index():
    cfg = ModelConfig(vocab_size=40, pad_id=0, bos_id=1, eos_id=2, image_size=16, patch_size=8, vision_hidden=16,
                      vision_layers=1, vision_heads=2, text_hidden=24, text_layers=1, text_heads=2, max_length=8,
                      decoder_hidden=16, decoder_layers=1, decoder_heads=2, embed_dim=16,
                      fusion="cross_attention", fusion_layers=2, fusion_self_attention=True, vqa_answers=["yes", "no"])
    model = MultimodalModel(cfg).eval()
    img_tok = model.image_tokens(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    ids = torch.randint(3, 40, (3, 6))
    mask = torch.ones_like(ids)
    txt_tok = model.text_tokens(ids, mask)
    index = torch.tensor([1, 1, 0])
    with torch.no_grad():
        assert torch.allclose(model.itm_logits(img_tok, txt_tok, mask, img_index=index),
                              model.itm_logits(img_tok[index], txt_tok, mask), atol=1e-6)
        assert torch.allclose(model.vqa_logits(img_tok, txt_tok, mask, img_index=index),
                              model.vqa_logits(img_tok[index], txt_tok, mask), atol=1e-6)


def test_mlm_through_fusion_trains_the_fusion_and_needs_token_states():
    """ALBEF's MLM: the masked caption's words are predicted from the fusion encoder's token states, so the MLM
    loss reaches the fusion's cross-attention (the separate MLM head's loss never does)."""
    base = dict(vocab_size=40, pad_id=0, bos_id=1, eos_id=2, image_size=16, patch_size=8, vision_hidden=16,
                vision_layers=1, vision_heads=2, text_hidden=24, text_layers=1, text_heads=2, max_length=8,
                decoder_hidden=16, decoder_layers=1, decoder_heads=2, embed_dim=16, fusion="cross_attention",
                fusion_layers=2, fusion_self_attention=True, mlm=True, mask_id=3)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    ids = torch.randint(4, 40, (2, 6))
    mask = torch.ones_like(ids)
    for through, reaches in ((True, True), (False, False)):
        model = MultimodalModel(ModelConfig(**base, mlm_through_fusion=through))
        logits = model.mlm_logits(model.image_tokens(images), ids, mask)
        assert logits.shape == (2, 6, 40)
        logits.sum().backward()
        grads = [q.grad for q in model.fusion.layers[0].attn.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches
    with pytest.raises(ValueError, match="token states"):
        MultimodalModel(ModelConfig(**{**base, "fusion": "concat"}, mlm_through_fusion=True))
