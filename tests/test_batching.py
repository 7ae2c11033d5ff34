"""Continuous batching: every request gets exactly its solo codes, whoever shares its steps and whenever it
joins; steps are shared; cancelled requests leave at the next step boundary."""
from __future__ import annotations

import pytest
import torch

from conftest import kernel_or_skip
from musicgen.engine import Engine
from musicgen.sampling import SamplingParams, sample, sample_groups
from musicgen.serve.scheduler import Scheduler, job_request


def run_to_end(sched: Scheduler, limit: int = 10_000):
    for _ in range(limit):
        if not sched.step() and not sched.pending:
            return
    raise AssertionError("scheduler did not finish")


def job(model, prompt, frames, params=SamplingParams(), seed=None, **inputs):
    """A service-style request of `frames` frames (one row)."""
    r = job_request(prompts=[prompt], duration=frames / model.frame_rate, top_k=params.top_k, top_p=params.top_p,
                    temperature=params.temperature, guidance_scale=params.guidance_scale, seed=seed, **inputs)
    r.tag["prompt"], r.tag["seed"] = prompt, seed
    return r


def solo(model, prompt, frames, **kw):
    return model.generate_codes([prompt], duration=frames / model.frame_rate, **kw)


@pytest.mark.parametrize("params", [SamplingParams(top_k=7), SamplingParams(top_k=0, top_p=0.8, temperature=0.7),
                                    SamplingParams(top_k=0), SamplingParams(top_k=1)])
def test_sample_groups_gives_each_group_its_solo_draw(params):
    logits = torch.randn(6, 4, 300, generator=torch.Generator().manual_seed(0))
    seeds, sizes = [3, 1, 4, 1], [1, 2, 1, 2]
    rows = sample_groups(logits, params, [torch.Generator().manual_seed(s) for s in seeds], sizes)
    alone, start = [], 0
    for s, n in zip(seeds, sizes):
        alone.append(sample(logits[start:start + n], params, torch.Generator().manual_seed(s)))
        start += n
    assert torch.equal(rows, torch.cat(alone))


def test_one_request_alone_equals_generate_codes(model):
    sched = Scheduler(model, max_batch=4)
    req = sched.submit(job(model, "lofi hip hop beat", 12, SamplingParams(top_k=1)))
    run_to_end(sched)
    assert req.status == "done" and req.done.is_set()
    assert torch.equal(req.codes, solo(model, "lofi hip hop beat", 12, top_k=1))
    assert sched.steps == req.steps == 12 + 3 + 1 - 1


@pytest.fixture(scope="module")
def int8_model(ckpt_dir):
    """Quantised on CPU: decoding steps go through the fused native decoder, with a position per row."""
    import musicgen

    kernel_or_skip("fused_decoder")
    m = musicgen.load(ckpt_dir, quantize="int8")
    assert m.backend.name == "fused"
    return m


@pytest.mark.parametrize("which", ["model", "int8_model"])
def test_requests_joining_at_different_steps_keep_their_solo_codes(request, which):
    model = request.getfixturevalue(which)
    greedy, sampled = SamplingParams(top_k=1), SamplingParams(top_k=5, temperature=0.9, guidance_scale=2.0)
    sched = Scheduler(model, max_batch=3)
    a = sched.submit(job(model, "epic orchestral soundtrack with strings, brass and choir", 20, greedy))
    for _ in range(5):
        sched.step()
    b = sched.submit(job(model, "techno", 8, sampled, seed=11))           # joins at step 5, leaves first
    sched.step()
    c = sched.submit(job(model, "jazz trio", 10, SamplingParams(top_k=1, guidance_scale=1.0)))   # one row
    d = sched.submit(job(model, "reggae groove", 6, greedy))              # waits: the batch is full
    run_to_end(sched)
    assert torch.equal(a.codes, solo(model, a.tag["prompt"], 20, top_k=1))
    assert torch.equal(b.codes, solo(model, "techno", 8, top_k=5, temperature=0.9, guidance_scale=2.0, seed=11))
    assert torch.equal(c.codes, solo(model, "jazz trio", 10, top_k=1, guidance_scale=1.0))
    assert torch.equal(d.codes, solo(model, "reggae groove", 6, top_k=1))
    # they shared decoding steps: fewer forward passes than the requests' steps added up
    assert sched.request_steps == sum(r.steps for r in (a, b, c, d))
    assert sched.steps < sched.request_steps
    assert all(r.shared_steps > 0 for r in (a, b, c, d))


def test_a_continuation_joining_mid_way_is_prefilled_and_keeps_its_solo_codes(model):
    """A request with known codes (a continuation prompt) joins a running batch: its prompt is prefilled into
    its slot in one pass, and it gets the codes generate_codes gives it alone."""
    prompt = torch.randint(0, 64, (1, 4, 7), generator=torch.Generator().manual_seed(5))
    sched = Scheduler(model, max_batch=2)
    a = sched.submit(job(model, "ambient", 16, SamplingParams(top_k=3), seed=1))
    for _ in range(4):
        sched.step()
    b = sched.submit(job(model, "rock", 12, SamplingParams(top_k=3), seed=2, prompt_codes=prompt))
    run_to_end(sched)
    assert torch.equal(a.codes, solo(model, "ambient", 16, top_k=3, seed=1))
    alone = model.new_request(["rock"], 12 / model.frame_rate, top_k=3, seed=2, prompt_codes=prompt)
    for _ in model.decode_steps(alone):
        pass
    assert torch.equal(b.codes, alone.codes) and torch.equal(b.codes[:, :, :7], prompt)
    assert b.steps == 12 + 3 - 7                                            # the prompt was not stepped through


def test_a_batch_request_and_a_single_one_share_an_engine(model):
    """A request of several rows (generate with a list of prompts) and a one-row request in one engine; the
    first leaves, the second moves down into its rows and still gets its solo codes."""
    engine = Engine(model, rows=8)
    big = model.new_request(["lofi", "rock", "jazz"], 5 / model.frame_rate, top_k=4, seed=3)
    small = model.new_request(["techno"], 11 / model.frame_rate, top_k=4, seed=4)
    engine.admit(big)
    engine.admit(small)
    assert (big.row, small.row) == (0, 6)
    while engine.active:
        engine.step()
    assert small.row == -1 and big.status == small.status == "done"
    assert torch.equal(big.codes, model.generate_codes(["lofi", "rock", "jazz"], 5 / model.frame_rate, top_k=4,
                                                       seed=3))
    assert torch.equal(small.codes, solo(model, "techno", 11, top_k=4, seed=4))


@pytest.fixture(scope="module")
def ckpt_64(tmp_path_factory, spm_model):
    """LM width 64 and vocabulary 128: every product of the LM has N % 16 == K % 64 == 0, the shapes where the
    int8 and int4 kernels take AMX tiles (int8 from 10 rows, int4 from 4) and aten's int4 kernel applies."""
    from conftest import build_hf_model, save_checkpoint

    return save_checkpoint(build_hf_model(lm_dim=64, vocab=128), tmp_path_factory.mktemp("w64"), spm_model)


@pytest.mark.parametrize("dtype,quantize", [("float32", "int8"), ("float32", "int4"), ("bfloat16", None)])
def test_ten_rows_keep_their_solo_codes(ckpt_64, any_backend, dtype, quantize):
    """Five requests at once: 10 rows with guidance, where the kernels switch to AMX tiles (on CPUs that have
    them) while a solo request's 2 rows do not. Each request still gets its solo codes, on every backend this
    machine runs (the fused step, the reference layer loop, and PyTorch's kernels without ours)."""
    import musicgen

    model = musicgen.load(ckpt_64, dtype=dtype, quantize=quantize)
    sched = Scheduler(model, max_batch=5)
    prompts = ["lofi", "rock", "jazz trio", "techno", "ambient pads"]
    reqs = [sched.submit(job(model, p, 12, SamplingParams(top_k=50), seed=i)) for i, p in enumerate(prompts)]
    run_to_end(sched)
    assert sched.steps < sched.request_steps
    for r in reqs:
        assert torch.equal(r.codes, solo(model, r.tag["prompt"], 12, top_k=50, seed=r.tag["seed"]))


def test_requests_with_equal_parameters_sample_together_with_their_own_seeds(model):
    params = SamplingParams(top_k=20, temperature=1.2, guidance_scale=2.7)
    sched = Scheduler(model, max_batch=4)
    reqs = [sched.submit(job(model, p, 9, params, seed=s)) for p, s in [("lofi", 1), ("lofi", 2), ("rock", 1)]]
    run_to_end(sched)
    for r in reqs:
        assert torch.equal(r.codes, solo(model, r.tag["prompt"], 9, top_k=20, temperature=1.2, guidance_scale=2.7,
                                         seed=r.tag["seed"]))
    assert not torch.equal(reqs[0].codes, reqs[1].codes)


def test_cancel_releases_at_the_next_step(model):
    sched = Scheduler(model, max_batch=2)
    a = sched.submit(job(model, "ambient", 30, SamplingParams(top_k=1)))
    b = sched.submit(job(model, "rock", 5, SamplingParams(top_k=1)))
    sched.step()
    sched.cancel(a)
    sched.step()
    assert a.status == "cancelled" and a.done.is_set() and a.steps == 1
    run_to_end(sched)
    assert b.status == "done" and torch.equal(b.codes, solo(model, "rock", 5, top_k=1))


def test_too_long_requests_are_refused(model):
    with pytest.raises(ValueError, match="positions"):
        Scheduler(model).submit(job(model, "x", 600))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_melody_models_batch_with_their_solo_codes(melody_model, melody_ckpt_dir, quantize):
    """Prefix-conditioned checkpoints: each request's chroma and text tokens are prefilled into its own slot
    (quantised: into the int8 cache rows the fused decoder then reads)."""
    if quantize is not None:
        import musicgen

        kernel_or_skip("fused_decoder")
        melody_model = musicgen.load(melody_ckpt_dir, quantize=quantize)
        assert melody_model.precision.self_kv == torch.int8
    tune = torch.sin(torch.arange(32000) / 32000 * 2 * torch.pi * 220.0)
    sched = Scheduler(melody_model, max_batch=3)
    a = sched.submit(job(melody_model, "folk song with a fiddle", 10, SamplingParams(top_k=1), melodies=[tune]))
    sched.step()
    b = sched.submit(job(melody_model, "rock", 6, SamplingParams(top_k=4), seed=2))      # no melody: null chroma
    run_to_end(sched)
    rate = melody_model.frame_rate
    assert torch.equal(a.codes, melody_model.generate_codes(["folk song with a fiddle"], duration=10 / rate,
                                                            top_k=1, melody=tune, demucs=False))
    assert torch.equal(b.codes, melody_model.generate_codes(["rock"], duration=6 / rate, top_k=4, seed=2))
    assert a.shared_steps > 0 and b.shared_steps > 0


def test_melody_given_to_a_text_model_fails_the_request(model):
    sched = Scheduler(model)
    r = sched.submit(job(model, "x", 5, melodies=[torch.zeros(3200)]))
    run_to_end(sched)
    assert r.status == "failed" and "melody checkpoint" in r.error
