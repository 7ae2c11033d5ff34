"""`musicgen train DATA --model ID -o RUN`: fine-tune a MusicGen checkpoint on prepared codes.

    for step in 1..steps:
        rows   = the step's global batch (dataset.py: a pure function of seed and step)
        for each micro-batch of this rank's rows:              batch_size = ranks x accumulate x micro-batch
            text   = frozen T5 of the augmented captions (no_grad)
            logits = Network(delayed codes, text, chroma)      (autocast in --precision)
            loss  += sum over codebooks k of cross-entropy_k / (K x targets of codebook k in the global batch)
            backward                                           (gradients reduced over ranks on the last one)
        clip the gradient norm at 1.0, AdamW step, cosine schedule step, EMA update (every 10th step)
        log; validate, sample, checkpoint when due
    export RUN/final (adapters merged, EMA weights when kept), RUN/loss.png

Each rank adds its share of the whole batch's loss, normalised by the global count of targets, so the
gradient equals that of the whole batch on one process whatever the number of ranks and micro-batches
(DDP and FSDP average over ranks, hence the factor `world`).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from . import state as st
from .dataset import Augment, CodesData
from .distributed import Dist, setup, sync_gradients, wrap
from .loss import codebook_sums, delayed_batch, target_counts
from .network import Network, text_states
from .options import EMA_EVERY, PRECISIONS, TrainConfig, check_options, dropouts

def lr_factor(i: int, warmup: int, steps: int) -> float:
    """Learning-rate multiplier for the (i+1)-th step: linear warm-up, then cosine down to a tenth."""
    s = i + 1
    if s <= warmup:
        return s / warmup
    progress = min(1.0, (s - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """audiocraft's bias-corrected moving average of the trained tensors (ModuleDictEMA with unbias=True), kept
    in float32 by name and stepped every `every` optimizer steps (audiocraft's optim.ema.updates, 10 for MusicGen).

    Each EMA step: count = count x decay + 1, then ema += (weights - ema) / count. The first step (count 1) takes
    the weights as they are, so the starting checkpoint's weights wash out of the average; a plain average with
    weight 1 - decay would keep decay ** n of them after n steps. count tends to 1 / (1 - decay), where the step
    becomes the plain one."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float, every: int = EMA_EVERY):
        self.decay, self.every, self.count = decay, every, 0.0
        self.params = dict(named)
        self.shadow = {n: p.detach().float().clone() for n, p in named}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Called after optimizer step `step` (from 1); averages on every `every`-th."""
        if step % self.every:
            return
        self.count = self.count * self.decay + 1
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 / self.count)

    def weights(self) -> dict:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def state_dict(self) -> dict:
        return dict(weights=self.weights(), count=self.count)

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"weights", "count"}:
            # a checkpoint written before the count was kept: its average had the steady-state weight
            state = dict(weights=state, count=1 / (1 - self.decay))
        self.count = float(state["count"])
        for n, t in state["weights"].items():
            self.shadow[n].copy_(t)


def checkpoint_layers(lm) -> None:
    """Activation checkpointing: each decoder layer keeps only its input for backward and recomputes the rest.
    The layer's forward is wrapped on the instance, so module and parameter names stay as they are."""
    from torch.utils.checkpoint import checkpoint

    for layer in lm.layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) the training `cfg` describes; returns RUN/final."""
    d = setup(cfg.device)
    trainer = None
    try:
        trainer = Trainer(cfg, d, resume)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        d.close()


class Trainer:
    def __init__(self, cfg: TrainConfig, d: Dist, resume: bool):
        from ..checkpoint import release
        from ..engine import Reference
        from ..loading import load

        self.cfg, self.d = cfg, d
        self.run_dir = Path(cfg.run)
        check_options(cfg, d.world)
        found = st.checkpoints(self.run_dir) if resume else []
        if resume and not (self.run_dir / "config.json").is_file():
            raise ValueError(f"nothing to resume in {self.run_dir}")
        if not resume:
            self._check_new_run()
        d.barrier()   # every rank has looked at RUN before rank 0 writes into it
        self.data = CodesData(cfg.data)
        self.model = load(cfg.model, device=d.device)
        self.data.check(self.model, cfg.model)
        model, mcfg = self.model, self.model.cfg
        if not cfg.sample_every:   # only samples decode audio: the codec goes once its fingerprint is checked
            for t in model.codec.state_dict().values():
                release(t)
            model.codec = None
        # samples during training decode through the PyTorch layer loop: the fused CPU step holds the tensors it
        # was built from, and training replaces or wraps them (adapters, FSDP's sharded parameters)
        model.backend = Reference()
        self.dtype = PRECISIONS[cfg.precision or ("bfloat16" if d.device.type == "cuda" else "float32")]
        self.K, self.special = mcfg.lm.num_codebooks, mcfg.lm.special_token
        duration = cfg.duration or self.data.meta["segment"]
        self.crop = max(1, round(duration * self.data.frame_rate))
        prefix = mcfg.melody.chroma_length if mcfg.melody is not None else 0
        need = self.crop + max(k // mcfg.audio_channels for k in range(self.K)) + 1 + prefix
        if need > mcfg.lm.max_position_embeddings:
            raise ValueError(f"--duration {duration:g} s needs {need} positions; {cfg.model} has "
                             f"{mcfg.lm.max_position_embeddings}")
        if cfg.sample_every:
            model.frames_for(cfg.sample_duration)   # a duration under one frame is named now, not at the first sample
        self.micro = cfg.batch_size // (d.world * cfg.accumulate)
        torch.manual_seed(cfg.seed)
        if cfg.lora_rank:
            from .lora import add_lora

            model.requires_grad_(False)
            add_lora(model.lm, cfg.lora_rank, cfg.lora_alpha)
        else:
            for part in (model.lm, model.text_proj, model.chroma_proj):
                if part is not None:
                    part.requires_grad_(True)
        self.net = Network(model).train()
        if cfg.grad_checkpoint:
            checkpoint_layers(self.net.lm)
        self.module = wrap(self.net, d, cfg.fsdp)
        # after wrapping: FSDP puts sharded parameters in the modules' place
        self.trained = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        lr = cfg.lr if cfg.lr is not None else (1e-4 if cfg.lora_rank else 1e-5)
        groups = [{"params": [p for _, p in self.trained if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for _, p in self.trained if p.dim() < 2], "weight_decay": 0.0}]
        # fused: one pass over every tensor instead of a dozen small operations per tensor (docs/training.md)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=d.device.type in ("cpu", "cuda"))
        warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 20)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, warmup=max(1, warmup), steps=cfg.steps))
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.dtype == torch.float16)
        # the fused AdamW applies the clipping coefficient (step()); float16's scaler uses that slot itself, and
        # FSDP's sharded parameters take no plain tensor beside them
        fused = self.optimizer.defaults.get("fused")
        self.fold_clip = bool(fused) and not self.scaler.is_enabled() and not cfg.fsdp and cfg.clip > 0
        self.ema = EMA(self.trained, cfg.ema) if cfg.ema > 0 else None
        cfg_dropout, word_dropout = dropouts(cfg, melody=mcfg.melody is not None)
        self.augment = Augment(cfg_dropout=cfg_dropout, word_dropout=word_dropout)
        self.start = 0
        # one training per RUN, from here on where RUN is written: a second one (started at the same moment,
        # or a run resumed twice) is refused instead of interleaving checkpoints and metrics
        self._lock = st.lock_run(self.run_dir) if d.main else None
        try:
            if d.main and not resume:
                self._check_new_run()   # again, now that RUN is ours: another run may have filled it meanwhile
            if found:
                self._restore(found[-1][1])
            elif d.main and not (self.run_dir / "config.json").is_file():
                from .encode import write_atomic

                write_atomic(self.run_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
            d.barrier()
            self.metrics = st.Metrics(self.run_dir, d.main, self.start)
        except BaseException:
            self.close()
            raise

    def _check_new_run(self) -> None:
        """A new run needs RUN empty or absent (its lock file aside)."""
        if self.run_dir.exists() and any(p.name != st.LOCK for p in self.run_dir.iterdir()):
            raise ValueError(f"{self.run_dir} exists; pass --resume to continue it, or choose a new -o RUN")

    # -- one step -----------------------------------------------------------------------------------------
    def _logits(self, batch, module) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.d.device
        inputs, targets = delayed_batch(batch.codes.to(dev), batch.lengths.to(dev), self.special,
                                        self.model.cfg.audio_channels)
        states, mask = text_states(self.model, batch.captions)
        chroma = batch.chroma.to(dev) if batch.chroma is not None else None
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = module(inputs, states, mask, chroma, mask_dtype=self.dtype)
        return logits, targets

    def step(self, step: int) -> dict:
        cfg, d = self.cfg, self.d
        started = time.perf_counter()
        rows = self.data.train_rows(step, cfg.batch_size, self.crop, cfg.seed, self.augment)
        frames = sum(r.frames for r in rows)                                  # all ranks
        counts = target_counts([r.frames for r in rows], self.K, self.model.cfg.audio_channels).to(d.device)
        share = cfg.batch_size // d.world
        mine = rows[d.rank * share:(d.rank + 1) * share]
        sums = torch.zeros(self.K, device=d.device)
        for i in range(cfg.accumulate):
            batch = self.data.collate(mine[i * self.micro:(i + 1) * self.micro], "train", self.special,
                                      self.model.cfg.melody)
            with sync_gradients(self.module, i == cfg.accumulate - 1):
                logits, targets = self._logits(batch, self.module)
                part = codebook_sums(logits, targets)                          # (K,)
                loss = (part / counts.clamp(min=1)).sum() / self.K * d.world
                self.scaler.scale(loss).backward()
            sums += part.detach()
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.trained]
        if self.fold_clip:
            # clipping inside the fused AdamW, which divides each gradient by `grad_scale` as it reads it: this
            # saves clip_grad_norm_'s pass that multiplies every gradient in place (the same update, to rounding)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            self.optimizer.grad_scale = torch.clamp((norm + 1e-6) / cfg.clip, min=1.0)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        try:
            self.scaler.step(self.optimizer)
        finally:
            if self.fold_clip:
                del self.optimizer.grad_scale
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(step)
        per_codebook = (d.sum(sums) / counts.clamp(min=1)).tolist()
        seconds = time.perf_counter() - started
        return dict(step=step, loss=sum(per_codebook) / self.K, codebook_losses=per_codebook, lr=lr,
                    grad_norm=float(norm), tokens_per_s=frames * self.K / seconds,
                    audio_s_per_s=frames / self.data.frame_rate / seconds)

    @torch.no_grad()
    def validate(self) -> tuple[float, list[float]]:
        """Loss over the whole validation split (first crop of each segment, captions and chroma as they are)."""
        d = self.d
        rows = self.data.valid_rows(self.crop)
        mine = rows[d.rank::d.world]
        chunks = math.ceil(math.ceil(len(rows) / d.world) / self.micro)   # the same count on every rank (FSDP)
        sums, count = torch.zeros(self.K, device=d.device), torch.zeros(self.K, device=d.device)
        module = self.module if self.cfg.fsdp else self.net   # FSDP gathers shards in its forward; DDP's is not needed
        for i in range(chunks):
            chunk = mine[i * self.micro:(i + 1) * self.micro]
            batch = self.data.collate(chunk or rows[:1], "valid", self.special, self.model.cfg.melody)
            logits, targets = self._logits(batch, module)
            if chunk:   # an empty chunk ran only to keep FSDP's collectives in step
                sums += codebook_sums(logits, targets)
                count += target_counts(batch.lengths.tolist(), self.K, self.model.cfg.audio_channels).to(d.device)
        per_codebook = (d.sum(sums) / d.sum(count).clamp(min=1)).tolist()
        return sum(per_codebook) / self.K, per_codebook

    def sample(self, step: int) -> None:
        from ..audio import save_audio

        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        audio = self.model.generate(list(self.cfg.sample_prompts), duration=self.cfg.sample_duration, seed=self.cfg.seed)
        for i, wav in enumerate(audio):
            save_audio(folder / f"step_{step:06d}_{i}.wav", wav, self.model.sample_rate)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _full_state(self) -> tuple[dict, dict]:
        """Whole (unsharded) trained tensors and optimizer state on rank 0's CPU; every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optim_state = get_state_dict(self.net, self.optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = {n for n, _ in self.trained}
        return {k: v for k, v in model_state.items() if k in names}, optim_state

    def save(self, step: int) -> None:
        model_state, optim_state = self._full_state()
        if self.d.main:
            payload = dict(format=1, step=step, model=model_state, optimizer=optim_state,
                           scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                           ema=self.ema.state_dict() if self.ema else None, rng=st.rng_states())
            st.save_checkpoint(self.run_dir, step, payload, self.cfg.keep)
        self.d.barrier()

    def _restore(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        payload = st.load_checkpoint(path)
        broadcast = self.cfg.fsdp   # only rank 0 reads the weights; the others receive their shards
        take = self.d.main or not broadcast
        options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=broadcast)
        # two calls: set_state_dict takes an empty model state (the other ranks') for "optimizer only"
        set_model_state_dict(self.net, payload["model"] if take else {}, options=options)
        set_optimizer_state_dict(self.net, self.optimizer, payload["optimizer"] if take else {}, options=options)
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.load_state_dict(payload["ema"])
        st.set_rng_states(payload["rng"])
        self.start = int(payload["step"])

    # -- the run -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Let RUN go: another training may write it now."""
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None

    def run(self) -> Path:
        from tqdm import tqdm

        cfg, d = self.cfg, self.d
        bar = tqdm(total=cfg.steps, initial=self.start, unit="step", desc="training", file=sys.stderr,
                   disable=not (cfg.progress and d.main), dynamic_ncols=True)
        has_valid = bool(self.data.splits["valid"])
        for step in range(self.start + 1, cfg.steps + 1):
            record = self.step(step)
            if has_valid and (step % cfg.valid_every == 0 or step == cfg.steps):
                record["valid_loss"], record["valid_codebook_losses"] = self.validate()
            self.metrics.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if cfg.sample_every and step % cfg.sample_every == 0 and d.main:
                self.sample(step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                self.save(step)
        bar.close()
        return self.finish()

    def finish(self) -> Path:
        """Export RUN/final (EMA weights when kept) and draw RUN/loss.png."""
        from .export import export

        trained, _ = self._full_state()
        final = self.run_dir / "final"
        if self.d.main:
            if self.ema is not None:
                trained = self.ema.weights()
            export(self.cfg.model, trained, final, self.cfg.lora_rank, self.cfg.lora_alpha)
            st.plot_loss(self.run_dir)
        self.metrics.close()
        self.d.barrier()
        return final
