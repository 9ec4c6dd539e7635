"""What the tests import from flash_attn.bert_padding (variable lengths only)."""
from flash_attn import unsupported


def pad_input(*args, **kwargs):
    unsupported("variable-length batches")


unpad_input = pad_input
