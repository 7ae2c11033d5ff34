"""EnCodec's convolutional stacks on CPU as matrix products over time windows.

`codec.Decoder` is latent -> conv -> LSTM -> stage C, where stage C is (ELU, ConvTranspose, ResBlock) per
scale, then ELU and a last conv. Run through torch's convolutions, stage C is most of a decode (about 0.9 s of
1.25 s for 10 s of audio on two cores), and little of that is arithmetic: at the high rates the tensors are
tens of MB each (64 channels x 320 000 samples), every layer allocates fresh pages for its output, pads by
copying, and the convolutions run at 20-60 GFLOP/s.

Here stage C works channels-last, (B, T, C), where every convolution is a few dense matrix products:
  - a stride-1 convolution of kernel k and dilation d is the sum over taps j of x[j*d : j*d + T] @ W_j, each
    operand a contiguous block of rows of the padded input (no im2col copy);
  - a transposed convolution of stride s is one product x @ W (T, k * cout) followed by an overlap-add of
    the k taps into the output, which is (T + ceil(k/s) - 1, s, cout) viewed as rows.
and the frames go through it in windows of about `WINDOW` frames, each with `context_frames` frames of
real context on either side that are computed and dropped, so the working set stays in cache and the
allocator reuses its memory. A window's kept middle only depends on frames that the window holds, so the
result is the whole-signal one up to float rounding (the sums run in another order;
tests/test_codec_fast.py compares it with the layer-by-layer modules).

The encoder's downsampling stack (before its LSTM) runs the same way: a convolution of stride s reads every
s-th row of the padded input, which BLAS takes as a matrix with a longer row stride, again without a copy;
windows start and end on frame edges, so every layer pads a window as it pads the whole signal.

The LSTM at the bottleneck (2 layers of 1024 units, one step per frame) runs layer by layer through a native
loop (`lstm`): the input projections of all frames in one product, then per frame one pass over the recurrent
weights for every batch row, and the gates. PyTorch's LSTM took 1.6-1.8x as long for 2 or 4 rows as for 1.

Used by `Decoder.forward`, `Encoder.forward` and the streaming decoder on CPU float32 without autograd;
Tests hold it to the layer modules (`Encoder.reference`, `Decoder.reference`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

WINDOW = 100   # frames per window at batch 1 (about 2 s of audio); measured best on two cores among 25..500


def lstm(module: nn.LSTM, x: torch.Tensor, state=None):
    """What `module(x, state)` returns, (y (T, B, H), (h, c) (layers, B, H)), through the native recurrence
    (kernels/lstm.cpp `lstm_layer`); None where that does not apply (no kernels, or an LSTM variant
    it does not cover)."""
    native = kernels.lstm_layer()
    if (native is None or x.dim() != 3 or module.batch_first or module.bidirectional or module.proj_size
            or module.hidden_size % 8 or (module.training and module.dropout)):
        return None
    T, B, _ = x.shape
    H, L = module.hidden_size, module.num_layers
    h0, c0 = state if state is not None else (x.new_zeros(L, B, H), x.new_zeros(L, B, H))
    hs, cs = [], []
    for layer in range(L):
        w_ih = getattr(module, f"weight_ih_l{layer}")
        rows = x.reshape(T * B, x.shape[-1])
        if module.bias:
            bias = getattr(module, f"bias_ih_l{layer}") + getattr(module, f"bias_hh_l{layer}")
            xw = torch.addmm(bias, rows, w_ih.t())
        else:
            xw = rows @ w_ih.t()
        x, h, c = native(xw.view(T, B, 4 * H), getattr(module, f"weight_hh_l{layer}"), h0[layer], c0[layer])
        hs.append(h)
        cs.append(c)
    return x, (torch.stack(hs), torch.stack(cs))


def enabled(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def split(stack) -> int:
    """Where the convolutions of a SEANet stack meet its LSTM: for the decoder, the index of the first layer
    after the LSTM block; for the encoder, the index of the LSTM block. -1 when the convolutional part holds a
    layer this module has no form for."""
    from ..codec import Conv, ConvTranspose, Decoder, LSTMBlock, ResBlock
    layers = list(stack.layers)
    lstm = [i for i, layer in enumerate(layers) if isinstance(layer, LSTMBlock)]
    if isinstance(stack, Decoder):
        start = lstm[-1] + 1 if lstm else 0
        part, strided = layers[start:], False
    else:
        start = lstm[0] if lstm else len(layers)
        part, strided = layers[:start], True
    for layer in part:
        if not isinstance(layer, (nn.ELU, Conv, ConvTranspose, ResBlock)):
            return -1
        if isinstance(layer, Conv) and layer.stride != 1 and not strided:
            return -1
        if isinstance(layer, ConvTranspose) and strided:
            return -1
    return start


def context_frames(layers, units_per_frame: int) -> int:
    """Frames either side of an output frame's span that its outputs can depend on (rounded up, plus one).

    `units_per_frame` is the output's rate: samples per frame for the decoder's upsampling stack, 1 for the
    encoder's downsampling stack."""
    from ..codec import Conv, ConvTranspose, ResBlock
    left = right = 0          # context in units of the current layer's output, walking from the last layer
    rate = units_per_frame    # units per frame at that point

    def conv(layer, lr):
        l, r = lr
        pl, _ = layer.padding(0)
        return l * layer.stride + pl, r * layer.stride + layer.effective_kernel - 1 - pl

    def through(layer, lr):
        if isinstance(layer, Conv):
            return conv(layer, lr)
        if isinstance(layer, ResBlock):
            a = lr
            for sub in reversed(list(layer.block)):
                a = through(sub, a)
            b = through(layer.shortcut, lr)
            return max(a[0], b[0]), max(a[1], b[1])
        return lr

    for layer in reversed(list(layers)):
        if isinstance(layer, ConvTranspose):
            k, s = layer.conv.kernel_size[0], layer.conv.stride[0]
            left, right = math.ceil((left + k) / s), math.ceil((right + k) / s)
            rate //= s
        else:
            if isinstance(layer, Conv):
                rate *= layer.stride
            left, right = through(layer, (left, right))
    return math.ceil(max(left, right) / max(rate, 1)) + 1


def _pad(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """Channels-last `codec._pad1d` along time (dim 1)."""
    if not (left or right):
        return x
    T = x.shape[1]
    if mode == "reflect" and T > max(left, right):
        return torch.cat([x[:, 1:left + 1].flip(1), x, x[:, T - 1 - right:T - 1].flip(1)], dim=1)
    from ..codec import _pad1d
    return _pad1d(x.transpose(1, 2), left, right, mode).transpose(1, 2).contiguous()


class _Weights:
    """Matrices of one convolution, made once per weight version."""

    def __init__(self, layer, key: tuple):
        from ..codec import ConvTranspose
        w, self.bias = layer.conv.weight, layer.conv.bias
        self.key = key
        if isinstance(layer, ConvTranspose):
            cin, cout, k = w.shape
            self.k, self.s, self.cout = k, layer.conv.stride[0], cout
            self.mat = w.detach().permute(0, 2, 1).reshape(cin, k * cout).contiguous()   # (cin, k * cout)
            if self.bias is not None:
                # the bias rides on tap block 0, which reaches every output row but the last ceil(k/s) - 1
                first = torch.zeros(k, cout, dtype=w.dtype)
                first[:min(self.s, k)] = self.bias.detach()
                self.bias_taps = first.reshape(-1)
        else:
            self.taps = [w.detach()[:, :, j].t().contiguous() for j in range(w.shape[2])]   # (cin, cout) each
            self.d = layer.conv.dilation[0]


def _weights(layer) -> _Weights:
    cached = layer.__dict__.get("_cl_weights")
    w, b = layer.conv.weight, layer.conv.bias
    key = (w.data_ptr(), w._version, None if b is None else b._version)
    if cached is None or cached.key != key:
        cached = _Weights(layer, key)
        layer.__dict__["_cl_weights"] = cached
    return cached


def _conv(layer, x: torch.Tensor) -> torch.Tensor:
    """`codec.Conv` on (B, T, cin) -> (B, T_out, cout)."""
    wts = _weights(layer)
    xp = _pad(x, *layer.padding(x.shape[1]), layer.pad_mode)
    B, Tp, cin = xp.shape
    k, d, s = len(wts.taps), wts.d, layer.stride
    T = (Tp - (k - 1) * d - 1) // s + 1
    if B > 1 and Tp % s:     # whole strides per batch row, so one row stride walks every batch
        xp = torch.cat([xp, xp.new_zeros(B, s - Tp % s, cin)], dim=1)
        Tp = xp.shape[1]
    xp = xp.contiguous()
    # output row r of the flattened batch reads input rows r*s + j*d; rows across a batch seam are dropped
    rows = (B * Tp - 1 - (k - 1) * d) // s + 1
    flat = xp.view(B * Tp, cin)
    out = torch.empty(B * Tp // s if B > 1 else rows, wts.taps[0].shape[1], dtype=x.dtype)
    head = out[:rows]
    span = (rows - 1) * s + 1
    if wts.bias is not None:
        torch.addmm(wts.bias, flat[:span:s], wts.taps[0], out=head)
    else:
        torch.mm(flat[:span:s], wts.taps[0], out=head)
    for j in range(1, k):
        head.addmm_(flat[j * d:j * d + span:s], wts.taps[j])
    return out.view(B, -1, out.shape[-1])[:, :T]


def _conv_transpose(layer, x: torch.Tensor) -> torch.Tensor:
    """`codec.ConvTranspose` on (B, T, cin) -> (B, T * s - trim, cout)."""
    wts = _weights(layer)
    B, T, cin = x.shape
    k, s, cout = wts.k, wts.s, wts.cout
    flat = x.reshape(B * T, cin)
    if wts.bias is not None:
        taps = torch.addmm(wts.bias_taps, flat, wts.mat)
    else:
        taps = flat @ wts.mat
    taps = taps.view(B, T, k, cout)
    blocks = -(-k // s)
    out = torch.empty(B, T + blocks - 1, s, cout, dtype=x.dtype)
    first = min(s, k)
    out[:, :T, :first] = taps[:, :, :first]
    if first < s:            # taps shorter than the stride leave gaps that only the bias fills
        out[:, :T, first:] = 0 if wts.bias is None else wts.bias
    if blocks > 1:
        out[:, T:] = 0 if wts.bias is None else wts.bias
    for q in range(1, blocks):
        width = min(s, k - q * s)
        out[:, q:q + T, :width] += taps[:, :, q * s:q * s + width]
    out = out.view(B, -1, cout)[:, :(T - 1) * s + k]
    left, right = layer.trim
    return out[:, left:out.shape[1] - right]


def _layer(layer, x: torch.Tensor, owned: bool) -> torch.Tensor:
    from ..codec import Conv, ConvTranspose, ResBlock
    if isinstance(layer, nn.ELU):
        return F.elu_(x, layer.alpha) if owned and x.is_contiguous() else F.elu(x, layer.alpha)
    if isinstance(layer, Conv):
        return _conv(layer, x)
    if isinstance(layer, ConvTranspose):
        return _conv_transpose(layer, x)
    if isinstance(layer, ResBlock):
        y, mine = x, False
        for sub in layer.block:
            y, mine = _layer(sub, y, mine), True
        short = _conv(layer.shortcut, x) if isinstance(layer.shortcut, Conv) else x
        return y.add_(short) if y.is_contiguous() else y + short
    raise TypeError(f"no channels-last form for {type(layer).__name__}")


def run(layers, x: torch.Tensor) -> torch.Tensor:
    """Stage C on a channels-last window (B, T, C) -> (B, T * hop, channels); x is not modified."""
    owned = False
    for layer in layers:
        x, owned = _layer(layer, x, owned), True
    return x


def decode(decoder, x: torch.Tensor, start: int) -> torch.Tensor:
    """`decoder(x)` for latent x (B, D, frames) -> audio (B, channels, frames * hop); `start` = split(decoder).
    Stage C runs windowed."""
    layers = list(decoder.layers)
    x = reference(layers[:start], x)
    stage = layers[start:]
    if x.shape[-1] == 0:
        return reference(stage, x)
    hop = math.prod(layer.conv.stride[0] for layer in stage if hasattr(layer, "trim"))
    margin = _margin(decoder, stage, hop)
    h = x.transpose(1, 2).contiguous()                 # (B, frames, C)
    return _windowed(stage, h, x.shape[-1], margin, 1, hop).transpose(1, 2).contiguous()


def encode(encoder, audio: torch.Tensor, start: int) -> torch.Tensor:
    """`encoder(audio)` for audio (B, channels, samples) -> latent (B, D, ceil(samples / hop)); `start` =
    split(encoder). The downsampling convolutions run windowed; windows start and end on frame edges, so each
    layer pads them as it pads the whole signal."""
    layers = list(encoder.layers)
    stage = layers[:start]
    hop = math.prod(layer.stride for layer in stage if hasattr(layer, "stride"))
    frames = -(-audio.shape[-1] // hop)
    if frames == 0:
        x = reference(stage, audio)
    else:
        x = audio.transpose(1, 2).contiguous()         # (B, samples, channels)
        x = _windowed(stage, x, frames, _margin(encoder, stage, 1), hop, 1).transpose(1, 2).contiguous()
    return reference(layers[start:], x)


def _margin(stack, stage, units_per_frame: int) -> int:
    """context_frames of `stage`, worked out once per stack."""
    margin = stack.__dict__.get("_cl_margin")
    if margin is None:
        margin = stack.__dict__["_cl_margin"] = context_frames(stage, units_per_frame)
    return margin


def _windowed(stage, x: torch.Tensor, frames: int, margin: int, units_in: int, units_out: int) -> torch.Tensor:
    """`run(stage, x)` for channels-last x holding `frames` frames of `units_in` rows each (the last may be
    short), a window of about WINDOW frames at a time with `margin` frames of context either side that are
    computed and dropped; the output has `units_out` rows per frame."""
    window = max(8, WINDOW // x.shape[0])
    pieces = []
    for begin in range(0, frames, window):
        end = min(frames, begin + window)
        lo, hi = max(0, begin - margin), min(frames, end + margin)
        y = run(stage, x[:, lo * units_in:hi * units_in])
        pieces.append(y[:, (begin - lo) * units_out:(end - lo) * units_out])
    return torch.cat(pieces, dim=1)


def reference(layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def decoder_reference(decoder, x: torch.Tensor) -> torch.Tensor:
    """The upsampling stack (after the LSTM) of `decoder` through its modules."""
    return reference(list(decoder.layers)[split(decoder):], x)
