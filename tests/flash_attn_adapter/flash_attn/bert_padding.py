"""Padded batch <-> packed tokens, as FlashAttention's test file uses them
(plain torch indexing; autograd carries the gradients through)."""
import torch


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """(B, S, ...) and a (B, S) mask of the tokens kept (plus `unused_mask`'s,
    allocated but unused) -> (the kept tokens (total, ...), their indices in
    the flattened (B S), cumulative lengths (B + 1, int32), the longest
    length (int), each sequence's used length (B, int32))."""
    kept = attention_mask + unused_mask if unused_mask is not None else attention_mask
    lengths = kept.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten()).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    tokens = hidden_states.reshape(-1, *hidden_states.shape[2:])[indices]
    return tokens, indices, cu_seqlens, int(lengths.max()), attention_mask.sum(dim=-1, dtype=torch.int32)


def pad_input(hidden_states, indices, batch, seqlen):
    """Packed tokens (total, ...) back to (batch, seqlen, ...), zeros elsewhere."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices,), hidden_states)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
