"""Acceleration: everything that makes the model faster without changing what it computes.

    quant.py    weight-only int8 / int4 layers (passes that swap nn.Linear)
    fused.py    the native CPU decoding step (every decoder layer in one call)
    codec.py    EnCodec's convolutions and LSTM on CPU as windowed matrix products
    kernels/    the C++ kernels those use, built on first use
"""
