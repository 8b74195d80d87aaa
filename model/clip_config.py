"""The SD 1.x text encoder: configs for ``transformers.CLIPTextModel`` (OpenAI CLIP ViT-L/14 text tower)."""

from __future__ import annotations

from torch import nn
from transformers import CLIPTextConfig

BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>, also the padding token of SD 1.x prompts


def clip_text_config(
    *,
    hidden_size: int = 768,
    num_hidden_layers: int = 12,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 49408,
    max_position_embeddings: int = 77,
) -> CLIPTextConfig:
    """SD 1.x defaults; heads default to one per 64 channels and the MLP to 4x hidden, as in CLIP."""
    return CLIPTextConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads or max(1, hidden_size // 64),
        intermediate_size=intermediate_size or 4 * hidden_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
    )


def state_dict_prefix(model: nn.Module) -> str:
    """Prefix of the model's own state_dict keys: "text_model." in transformers 4, none since transformers 5."""
    return "text_model." if hasattr(model, "text_model") else ""
