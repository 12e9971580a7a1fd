"""Caption generation helpers shared by RL, evaluation and the served model."""

from __future__ import annotations

import torch

from mmplatform.models.multimodal import MultimodalModel


def decode_text(tokenizer, tokens: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)]


@torch.no_grad()
def greedy_captions(model: MultimodalModel, tokenizer, images: torch.Tensor, max_length: int,
                    batch: int = 256) -> list[str]:
    out: list[str] = []
    for i in range(0, len(images), batch):
        mem = model.memory(model.image_tokens(images[i:i + batch]))
        toks, _ = model.generate(mem, max_length, greedy=True)
        out.extend(decode_text(tokenizer, toks))
    return out
