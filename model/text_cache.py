"""Text embeddings of token-id rows, cached: services see the same texts again and again (a default negative
prompt, "4 more like this"), and each row's embedding depends on its own tokens (and the text encoder LoRAs of its
request) only, so a cached row is what the encoder would give again (up to float summation order in a differently
sized batch). SDXL rows keep their pooled embedding beside them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from model.lora_rows import NO_LORA, LoraBatch
from model.sdxl import encode_text as sdxl_encode_text
from model.sdxl import second_tokenizer_ids

TEXT_CACHE_SIZE = 256  # rows kept (118 KiB each in bf16, 236 KiB in fp32 for SD 1.x)

Key = tuple[str, tuple[int, ...]]  # (the request's text encoder LoRAs, token ids)


class TextEmbeddings:
    """The text encoder(s) of a pipeline behind an LRU cache of rows."""

    def __init__(self, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection | None,
                 eos_id: int, device: torch.device, dtype: torch.dtype) -> None:
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.eos_id, self.device, self.dtype = eos_id, device, dtype
        self.pad_id_2 = 0  # SDXL: the second tokenizer's pad id ("!" unless its folder says otherwise)
        self.cache: OrderedDict[Key, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    def encode(self, ids: torch.Tensor, lora: LoraBatch = NO_LORA, owners: Sequence[int] = ()
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings [B, 77, 768] of token ids [B, 77] (SDXL: [B, 77, 2048] and the pooled [B, 1280], else None);
        only the rows not in the cache are encoded. Row ``i`` belongs to request ``owners[i]``, whose text encoder
        LoRAs (``lora``) are part of the key."""
        keys = [(lora.text_keys[o] if lora.text_keys else "", tuple(row))
                for o, row in zip(owners or [0] * len(ids), ids.tolist(), strict=True)]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            owner_of = dict(zip(keys, owners or [0] * len(ids), strict=True))
            fresh_ids = torch.tensor([k[1] for k in missing], device=self.device)
            fresh_pooled: list[torch.Tensor | None] = [None] * len(missing)
            with lora.text_rows([owner_of[k] for k in missing]):
                if self.text_encoder_2 is None:
                    fresh = self.text_encoder(input_ids=fresh_ids).last_hidden_state
                else:
                    ids_2 = second_tokenizer_ids(fresh_ids, self.eos_id, self.pad_id_2)
                    fresh, pooled = sdxl_encode_text(self.text_encoder, self.text_encoder_2, fresh_ids, ids_2)
                    fresh_pooled = list(pooled.float())
            for key, row, pooled_row in zip(missing, fresh.to(self.dtype), fresh_pooled, strict=True):
                self.cache[key] = (row, pooled_row)
        out = torch.stack([self.cache[k][0] for k in keys])
        pooled_rows = [self.cache[k][1] for k in keys]
        for key in keys:
            self.cache.move_to_end(key)
        while len(self.cache) > TEXT_CACHE_SIZE:
            self.cache.popitem(last=False)
        if any(p is None for p in pooled_rows):
            return out, None
        return out, torch.stack([p for p in pooled_rows if p is not None])
