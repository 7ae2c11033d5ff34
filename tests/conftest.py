"""Shared fixtures: tiny random MusicGen checkpoints in the official Hugging Face format.

Official weights cannot be downloaded here, so every test builds its own checkpoint with transformers (the
test oracle), saves it exactly as the hub publishes them, and loads it back with our code.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import torch

CORPUS = """80s pop track with bassy drums and synth
90s rock song with loud guitars and heavy drums
lofi hip hop beat with mellow piano and vinyl crackle
epic orchestral soundtrack with strings, brass and choir
a calm acoustic guitar melody, 120 bpm, in C major
techno with driving kick drum and acid bass line
jazz trio: upright bass, brushed drums & piano solo
ambient pads, slow evolving textures, reverb; 60 BPM
reggae groove with offbeat guitar and deep dub bass
""".splitlines()


def train_spm(folder: Path, vocab_size: int = 200) -> Path:
    """A T5-style sentencepiece model (pad 0, eos 1, unk 2, no bos) trained on a toy corpus."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "spiece"), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    return folder / "spiece.model"


def hf_config(stereo: bool = False, lm_dim: int = 48, vocab: int = 64, text_dim: int = 32, layers: int = 2):
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    text = T5Config(vocab_size=200, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    feed_forward_proj="relu", dropout_rate=0.0)
    codec = EncodecConfig(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], use_causal_conv=False,
                          use_conv_shortcut=False, codebook_size=vocab, num_filters=4, hidden_size=16,
                          target_bandwidths=[4 * (vocab.bit_length() - 1) * 50 / 1000], normalize=False,
                          chunk_length_s=None, audio_channels=1)
    decoder = MusicgenDecoderConfig(vocab_size=vocab, hidden_size=lm_dim, num_hidden_layers=layers,
                                    num_attention_heads=4, ffn_dim=2 * lm_dim, num_codebooks=8 if stereo else 4,
                                    audio_channels=2 if stereo else 1, pad_token_id=vocab, bos_token_id=vocab,
                                    dropout=0.0, max_position_embeddings=512)
    return MusicgenConfig(text_encoder=text, audio_encoder=codec, decoder=decoder)


def build_hf_model(seed: int = 0, **kw):
    from transformers import MusicgenForConditionalGeneration

    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(hf_config(**kw)).eval()
    # transformers initialises EnCodec codebooks to zeros; random codebooks make quantisation meaningful
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    vocab = model.config.decoder.vocab_size
    model.generation_config.pad_token_id = vocab
    model.generation_config.decoder_start_token_id = vocab
    model.generation_config.bos_token_id = vocab
    return model


def build_hf_melody_model(seed: int = 0, stereo: bool = False, chroma_length: int = 24):
    """A tiny random MusicgenMelodyForConditionalGeneration (prefix conditioning on chroma + text)."""
    from transformers import MusicgenMelodyConfig, MusicgenMelodyDecoderConfig, MusicgenMelodyForConditionalGeneration

    base = hf_config(stereo=stereo)
    decoder = MusicgenMelodyDecoderConfig(**{k: v for k, v in base.decoder.to_dict().items()
                                             if k in MusicgenMelodyDecoderConfig().to_dict()
                                             and k not in ("model_type", "architectures", "transformers_version")})
    cfg = MusicgenMelodyConfig(text_encoder=base.text_encoder, audio_encoder=base.audio_encoder, decoder=decoder,
                               chroma_length=chroma_length)
    torch.manual_seed(seed)
    model = MusicgenMelodyForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    vocab = model.config.decoder.vocab_size
    model.generation_config.pad_token_id = vocab
    model.generation_config.decoder_start_token_id = vocab
    model.generation_config.bos_token_id = vocab
    return model


def save_checkpoint(model, folder: Path, spm_model: Path, old_weight_norm: bool = False) -> Path:
    """save_pretrained plus tokenizer files; optionally rewrite weight norm in the weight_g/weight_v spelling."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import T5Tokenizer

    model.save_pretrained(folder)
    # the hub repos ship spiece.model and the tokenizer.json converted from it; make both the same way
    shutil.copy(spm_model, folder / "spiece.model")
    T5Tokenizer.from_pretrained(folder, extra_ids=0).save_pretrained(folder)
    if old_weight_norm:
        f = folder / "model.safetensors"
        state = load_file(str(f))
        renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                    .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
        assert renamed != state, "expected parametrized weight norm names in the saved file"
        save_file(renamed, str(f), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm"))


def pytest_addoption(parser):
    parser.addoption("--require-kernels", action="store_true",
                     help="fail, instead of skipping, the tests of native CPU kernels that did not build (CI)")
    parser.addoption("--require-browser", action="store_true",
                     help="fail, instead of skipping, the browser test when chromium is missing (CI)")


def pytest_configure(config):
    global REQUIRE_KERNELS
    REQUIRE_KERNELS = config.getoption("--require-kernels")


REQUIRE_KERNELS = False


def kernel_or_skip(name: str):
    """musicgen.accel.kernels.<name>() (int8_gemv, int4_gemv, fused_decoder); skips where the CPU kernels cannot be
    built here, and fails instead under --require-kernels (CI)."""
    from musicgen.accel import kernels

    kernel = getattr(kernels, name)()
    if kernel is None:
        if REQUIRE_KERNELS:
            pytest.fail(f"the {name} CPU kernel did not build (--require-kernels)")
        pytest.skip(f"no AVX2/FMA/F16C CPU or C++ compiler: {name} is not built here")
    return kernel


@pytest.fixture(autouse=True)
def kernels_at_their_best():
    """Tests may cap the kernels' instruction-set level (kernels.limit_isa); every test ends with the cap lifted."""
    yield
    import sys

    kernels = sys.modules.get("musicgen.accel.kernels")
    if kernels is not None:
        kernels.limit_isa(None)   # builds nothing: where the kernels are not built yet, it only records the cap


BACKENDS = ["fused", "reference", "no-kernels"]


@pytest.fixture(params=BACKENDS)
def any_backend(request):
    """Every way this machine can run decoding steps, in turn: the fused native step (where the kernels build),
    the PyTorch layer loop, and the layer loop without our kernels at all (PyTorch's packed kernels for
    quantised layers: ARM, macOS, no compiler). Models loaded inside the test get that backend."""
    from musicgen import accel

    if request.param == "fused":
        kernel_or_skip("fused_decoder")
        with accel.override(backend="fused"):
            yield request.param
    elif request.param == "reference":
        with accel.override(backend="reference"):
            yield request.param
    else:
        with accel.override(kernels=False):
            yield request.param


@pytest.fixture(scope="session")
def hf_model():
    return build_hf_model()


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory, hf_model, spm_model) -> Path:
    return save_checkpoint(hf_model, tmp_path_factory.mktemp("tiny"), spm_model)


@pytest.fixture(scope="session")
def ckpt_dir_old_wn(tmp_path_factory, hf_model, spm_model) -> Path:
    return save_checkpoint(hf_model, tmp_path_factory.mktemp("tiny_wn"), spm_model, old_weight_norm=True)


@pytest.fixture(scope="session")
def hf_melody_model():
    return build_hf_melody_model()


@pytest.fixture(scope="session")
def melody_ckpt_dir(tmp_path_factory, hf_melody_model, spm_model) -> Path:
    return save_checkpoint(hf_melody_model, tmp_path_factory.mktemp("tiny_melody"), spm_model)


@pytest.fixture(scope="session")
def melody_model(melody_ckpt_dir):
    import musicgen

    return musicgen.load(melody_ckpt_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(ckpt_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt_dir)


@pytest.fixture(scope="session")
def model(ckpt_dir):
    import musicgen

    return musicgen.load(ckpt_dir)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def running_server(model, data_dir: Path, **kw):
    """A real uvicorn server for `Service(model, data_dir, **kw)` on a free loopback port, in a thread."""
    import socket
    import threading

    import uvicorn

    from musicgen.serve.service import Service, create_app

    service = Service(model, data_dir, model_name="tiny-random", **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
