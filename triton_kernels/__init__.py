"""Triton kernels of pyext, one module per op, installed as pyext.triton_kernels.

Kernels plus host launch functions only: no autograd, no dispatch (pyext.ops
does that). Every kernel also runs on CPU tensors under TRITON_INTERPRET=1.
"""
