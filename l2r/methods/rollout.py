"""Attention rollout (Abnar & Zuidema 2020) of a timm ViT; class-agnostic. One forward per image."""
from __future__ import annotations

import torch

from l2r.methods.common import model_name, token_grid, vit_blocks
from l2r.methods.registry import Method, register


@torch.no_grad()
def _rollout(model, images, targets):
    net = getattr(model, "net", model)
    blocks = vit_blocks(net)
    if blocks is None:
        raise ValueError(f"rollout needs a timm-style ViT with attention blocks; "
                         f"{model_name(model)} is not one")
    attentions = _capture_attention(model, images, blocks)
    tokens = attentions[0].shape[-1]
    identity = torch.eye(tokens, device=images.device)
    rollout = identity.expand(images.shape[0], tokens, tokens)
    for attention in attentions:
        attention = attention.mean(dim=1)  # heads
        # Abnar & Zuidema: residual connection as identity, then rows renormalised.
        attention = attention + identity
        attention = attention / attention.sum(dim=-1, keepdim=True)
        rollout = attention @ rollout
    prefix = int(net.num_prefix_tokens)
    if getattr(net, "cls_token", None) is not None and getattr(net, "global_pool", "token") == "token":
        relevance = rollout[:, 0, prefix:]
    else:
        # The head pools the patch tokens (avg; attention pooling approximated the same way),
        # so every patch token's row contributes to the output.
        relevance = rollout[:, prefix:, prefix:].mean(dim=1)
    grid_h, grid_w = token_grid(net, relevance.shape[-1], *images.shape[-2:])
    return relevance.reshape(-1, grid_h, grid_w)


def _capture_attention(model, images, blocks):
    """Attention probabilities (B,heads,T,T) of every block, in order.

    timm's Attention uses fused scaled-dot-product attention, which never materialises the
    probabilities; the unfused path passes them through `attn_drop`, so it is switched on for
    this one forward and `attn_drop` is hooked (identity in eval mode).
    """
    captured = [None] * len(blocks)
    handles, fused_before = [], []
    try:
        for index, block in enumerate(blocks):
            attn = block.attn
            if not hasattr(attn, "attn_drop"):
                raise ValueError(f"rollout cannot read attention of {type(attn).__name__}")
            fused_before.append(getattr(attn, "fused_attn", None))
            if hasattr(attn, "fused_attn"):
                attn.fused_attn = False

            def save(module, inputs, output, index=index):
                captured[index] = output.detach()

            handles.append(attn.attn_drop.register_forward_hook(save))
        model.logits(images)
    finally:
        for handle in handles:
            handle.remove()
        for block, fused in zip(blocks, fused_before):
            if fused is not None:
                block.attn.fused_attn = fused
    if any(attention is None for attention in captured):
        raise ValueError("rollout: some attention blocks did not expose their probabilities")
    return captured



register(Method("rollout", _rollout, defaults={}, cost=lambda settings: (1, 0), summary="attention rollout (ViT)"))
