"""What the tests import from flash_attn.layers.rotary (KV cache tests only)."""
from flash_attn import unsupported


def apply_rotary_emb(*args, **kwargs):
    unsupported("rotary embeddings in a KV cache")
