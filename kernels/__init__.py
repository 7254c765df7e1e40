"""Triton kernels, one op per file, installed as ``maskedssl.kernels``: kernels and launchers only
(validation, dispatch and autograd live in ``maskedssl.ops``)."""
