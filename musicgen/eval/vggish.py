"""VGGish (Hershey et al. 2017) for FAD: a port of torchvggish that loads its weight file unchanged, fed the
examples Google's FAD code (which audiocraft runs) cuts.

    16 kHz mono -> 1 s windows every 0.5 s, the tail that fills no window dropped
      -> per window: frames of 25 ms every 10 ms (periodic Hann, |rfft 512|) -> 64 HTK-mel bands 125-7500 Hz
      -> log(mel + 0.01) -> the window's first 96 frames (0.96 s) as its one example
      -> VGG (4 conv blocks) -> 3 fully connected layers -> 128-d per example

The windows are AudioSetModel.extract_features with create_embeddings_main's default step of 8000 samples;
each window's log-mel is torchvggish's `waveform_to_examples` of that window alone (98 frames, one example).
The embedding is the last layer's raw output: no final ReLU and no PCA/quantisation post-processing, as in
Google's FAD code, fadtk and frechet-audio-distance. The features are computed in float64 as torchvggish's
numpy code does, for a whole batch of clips at once.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
WINDOW, HOP, N_FFT = 400, 160, 512          # 25 ms, 10 ms, next power of 2
EXAMPLE_FRAMES = 96                         # 0.96 s: the first 96 of a window's 98 frames
CLIP_WINDOW, CLIP_STEP = 16000, 8000        # Google's FAD: a 1 s window every 0.5 s, one example each
STEP_FRAMES = CLIP_STEP // HOP              # 50: window i starts at the clip's frame 50 i
MIN_SAMPLES = CLIP_WINDOW                   # the shortest clip that gives one example
WEIGHTS = "vggish-10086976.pth"


@functools.lru_cache(maxsize=1)
def mel_matrix() -> torch.Tensor:
    """(257, 64) HTK-mel triangles, torchvggish's spectrogram_to_mel_matrix (the DC bin zeroed)."""
    def hz_to_mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)
    bins_mel = hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1))
    edges = np.linspace(hz_to_mel(125.0), hz_to_mel(7500.0), 64 + 2)
    lower = (bins_mel[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - bins_mel[:, None]) / (edges[2:] - edges[1:-1])
    m = np.maximum(0.0, np.minimum(lower, upper))
    m[0, :] = 0.0
    return torch.from_numpy(m)


def examples(wav: torch.Tensor) -> torch.Tensor:
    """Mono (samples,) at 16 kHz -> log-mel examples (n, 96, 64) float32, one per 1 s window every 0.5 s:
    n = 1 + (samples - 16000) // 8000, and 0 below MIN_SAMPLES."""
    x = wav.detach().to("cpu", torch.float64)
    n = 1 + (x.shape[-1] - CLIP_WINDOW) // CLIP_STEP if x.shape[-1] >= CLIP_WINDOW else 0
    if n == 0:
        return torch.zeros(0, EXAMPLE_FRAMES, 64)
    # The step is a whole number of hops and a frame sees only its own 400 samples, so window i's frames are
    # the clip's frames 50 i ... 50 i + 95: the log-mel is computed once for the clip and the examples share it.
    frames = x.unfold(0, WINDOW, HOP)[: (n - 1) * STEP_FRAMES + EXAMPLE_FRAMES]   # (frames, 400)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi / WINDOW * torch.arange(WINDOW, dtype=torch.float64))
    spec = torch.fft.rfft(frames * window, N_FFT).abs()                        # (frames, 257)
    log_mel = torch.log(spec @ mel_matrix() + 0.01)                            # (frames, 64)
    return log_mel.unfold(0, EXAMPLE_FRAMES, STEP_FRAMES).transpose(1, 2).float().contiguous()   # (n, 96, 64)


class VGGish(nn.Module):
    """torchvggish's VGG with its parameter names (features.N, embeddings.N), minus the final ReLU."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Linear(4096, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 96, 64) log-mel examples -> (B, 128)."""
        x = self.features(x[:, None])                                          # (B, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)                      # torchvggish's (H, W, C) order
        return self.embeddings(x)


class VGGishEmbedder:
    """Clips (mono at 16 kHz) -> (examples, 128) float32 each, run in batches of examples."""
    name = "vggish"
    sample_rate = SAMPLE_RATE
    dim = 128

    def __init__(self, model: VGGish, fingerprint: str, device: str = "cpu", batch_size: int = 64):
        self.model, self.fingerprint = model.eval().to(device), fingerprint
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def embed(self, clips: list[torch.Tensor]) -> list[np.ndarray]:
        feats = [examples(c) for c in clips]
        flat = torch.cat(feats) if feats else torch.zeros(0, EXAMPLE_FRAMES, 64)
        out = [self.model(flat[i:i + self.batch_size].to(self.device)).float().cpu()
               for i in range(0, flat.shape[0], self.batch_size)]
        emb = torch.cat(out).numpy() if out else np.zeros((0, 128), np.float32)
        return np.split(emb, np.cumsum([f.shape[0] for f in feats])[:-1])


def load(path, device: str = "cpu", fingerprint: str = "") -> VGGishEmbedder:
    """The embedder with torchvggish's `vggish-10086976.pth` (a plain state dict)."""
    from .weights import read_state

    model, state = VGGish(), read_state(path)
    try:   # the last ReLU has no parameters: the names match one for one
        model.load_state_dict(state)
    except (RuntimeError, AttributeError) as e:
        raise ValueError(f"{path} is not torchvggish's VGGish: {str(e).splitlines()[0]}") from None
    return VGGishEmbedder(model, fingerprint, device)
