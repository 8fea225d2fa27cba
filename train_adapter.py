"""Train the FACT face adapter (FaceChain FACT) on a folder of people. nanoGPT-shaped: read it top down;
the machinery is in studio/adapter/: trainconfig.py (TrainConfig: every config key), data.py (dataset,
preprocessing cache, ID-shuffle sampler), checkpoint.py (checkpoints and exact resume).

Run (from the repository root):

    uv run python train_adapter.py configs/train_tiny.toml                      # CPU, seconds, tiny kit
    accelerate launch --multi_gpu train_adapter.py configs/train_sd15.toml      # SD 1.5 on all GPUs
    uv run python train_adapter.py configs/train_sd15.toml --resume             # = --resume latest
    uv run python train_adapter.py configs/train_sd15.toml --resume outputs/fact-sd15/ckpt/step_2000
    uv run python train_adapter.py configs/train_tiny.toml --set lr=3e-4 --set max_steps=50

Dataset: ``DATASET/<person>/<photo>.png|jpg|jpeg|webp``, one sub-folder per identity; a ``<photo>.txt``
beside a photo is its caption (otherwise ``caption`` from the config). Photos without exactly one usable
face are skipped with a log line. With validation on, one identity (``val_identity``, default the last
folder) is held out of training and its face steers the validation pictures.

What happens: 1. config, Accelerator, seeds; 2. frozen VAE / text encoder / UNet, trainable adapter;
3. preprocessing cached per photo sha256 (latents, face tokens + embedding, face mask, caption embedding);
4. ID-shuffle sampling (condition = another photo of the same person) with condition drop; 5. the loop:
FAIR loss = diffusion MSE + lam x adapter increment outside the face; 6. validation pictures;
7. checkpoints (adapter, optimizer, LR schedule, step, every RNG, config) that ``--resume`` continues
exactly. Outputs in ``out_dir``: ``cache/``, ``val/step_N.png``, ``ckpt/step_N/``, ``adapter.safetensors``
(copy it to ``adapters/<name>.safetensors`` to use it). The tiny kit's models have random weights and a
fixture detector: its pictures are not portraits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from studio.adapter import FaceAdapter, attach, build_adapter, data, increments, set_recording
from studio.adapter import checkpoint as ckpt
from studio.adapter.checkpoint import RunState
from studio.adapter.data import FaceDataset as FaceDataset  # "X as X": re-exported (tests use it)
from studio.adapter.data import IdShuffleSampler as IdShuffleSampler  # re-exported
from studio.adapter.data import Photo
from studio.adapter.loss import fair_loss
from studio.adapter.tokens import FaceTokenEncoder
from studio.adapter.trainconfig import TrainConfig, load_train_config, resolve_model
from studio.adapter.trainconfig import config_to_dict as config_to_dict  # re-exported
from studio.errors import StudioError
from studio.files import sha256_file
from studio.imageio import format_parameters, from_pil, read_image, write_image

logger = logging.getLogger("train_adapter")


@dataclass
class TrainResult:
    """What a run produced: the final adapter file, the adapter itself, per-step losses."""

    path: Path
    adapter: FaceAdapter
    step: int
    history: list[dict[str, float]] = field(default_factory=list)


class Denoiser(nn.Module):
    """The frozen UNet (adapter fusers attached) and the adapter as one module for accelerate / DDP."""

    def __init__(self, unet: nn.Module, adapter: FaceAdapter) -> None:
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        tokens: torch.Tensor,
        embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Noise prediction [B, 4, h, w] and each fuser's increment [B, N, C] for the FAIR loss."""
        set_recording(self.adapter, True)
        kwargs = self.adapter.face_kwargs(tokens, embedding, scale=1.0, cfg=False)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
        found = increments(self.adapter)
        set_recording(self.adapter, False)  # the list above keeps what the loss needs
        return pred, found


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train the face adapter; ``resume`` is a checkpoint folder or "latest". Returns the final adapter."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # 1. setup: Accelerator, seeds (identical on every process, so the adapter starts identical)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum
    )
    set_seed(config.seed)
    ckpt_dir = ckpt.find_checkpoint(config.out_dir, resume) if resume else None
    if ckpt_dir is not None:
        ckpt.check_resume_config(config, ckpt_dir)
    # 2. models: VAE, text encoder, UNet frozen; only the adapter trains (main process first: it may
    #    download the base model or build the tiny kit; the others then find it)
    with accelerator.main_process_first():
        models = _prepare_models(config, accelerator.device)
    run = _prepare_run(config, accelerator, models)
    # 3. data: preprocess once per photo (main process first, the others read its cache)
    with accelerator.main_process_first():
        photos = data.prepare_dataset(config, _preprocessor(config, models, accelerator.device))
    train_photos, val_photo = data.split_validation(config, photos)
    if ckpt_dir is not None:
        ckpt.load_checkpoint(run, ckpt_dir)
    # 4. sampling: ID shuffle with condition drop from the (resumed) position; noise per process
    num_timesteps = models["noise_scheduler"].config.num_train_timesteps
    batches = _sampling(run, train_photos, num_timesteps)
    # 5. the loop, with 6. validation pictures and 7. checkpoints
    history = _loop(run, batches, models, val_photo)
    final = ckpt.save_final_adapter(run)
    return TrainResult(final, accelerator.unwrap_model(run.denoiser).adapter, run.step, history)


# --- 2. models ----------------------------------------------------------------------------------------
def _prepare_models(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Frozen VAE / text encoder / UNet on the device, face models, a fresh adapter attached to the UNet."""
    from studio.models.runtime import load_insightface_model, onnx_providers

    # 1. locate everything (building the tiny kit if the config names one that is not there)
    base = resolve_model(config, config.base_model, folder=True)
    detector_path, recognizer_path = (
        resolve_model(config, ref) for ref in (config.detector, config.recognizer)
    )
    # 2. the base model's parts, frozen
    parts = _load_base(base, config.mixed_precision, device)
    if config.kit:
        from studio.models.tiny import NOT_A_PORTRAIT

        logger.warning("%s: the adapter learns nothing real, validation pictures are noise", NOT_A_PORTRAIT)
    # 3. face models (ONNX), then the adapter: float32, attached after the UNet was frozen and cast
    providers = onnx_providers(config.onnx_providers)
    detector = load_insightface_model(detector_path, providers)
    encoder = FaceTokenEncoder(recognizer_path, providers)
    adapter = _new_adapter(config, parts["unet"], encoder, recognizer_path)
    model_ids = [base, sha256_file(detector_path), adapter.spec.encoder_sha256]
    faces = {"detector": detector, "encoder": encoder, "adapter": adapter, "model_ids": model_ids}
    return {"base": base, **parts, **faces}


def _load_base(base: str, mixed_precision: str, device: torch.device) -> dict[str, Any]:
    """Tokenizer, text encoder, VAE, UNet (frozen, on ``device``) and the DDPM noise schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # only the UNet runs in the mixed-precision dtype: the VAE and the text encoder only preprocess
    # (their cached outputs then do not depend on the precision setting)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=weight_dtype)
    unet.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    text_encoder.to(device).eval()
    vae.to(device).eval()
    unet.to(device)
    parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet}
    return {**parts, "noise_scheduler": noise_scheduler}


def _new_adapter(
    config: TrainConfig, unet: nn.Module, encoder: FaceTokenEncoder, recognizer_path: str
) -> FaceAdapter:
    """A fresh adapter sized for ``unet`` and ``encoder``'s tokens, gates at gate_init, attached."""
    adapter = build_adapter(
        unet,
        base_family=config.base_family,
        face_encoder=Path(config.recognizer).stem,
        encoder_sha256=sha256_file(Path(recognizer_path)),
        token_shape=encoder.token_shape,
        num_queries=config.num_queries,
        heads=config.heads,
        depth=config.depth,
    )
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.alpha.fill_(config.gate_init)
    attach(adapter, unet)
    adapter.train()
    return adapter


def _prepare_run(config: TrainConfig, accelerator: Any, models: dict[str, Any]) -> RunState:
    """UNet + adapter as one module, AdamW over the adapter only, LR schedule, per-process noise RNG."""
    from diffusers.optimization import get_scheduler

    adapter = models["adapter"]
    denoiser = Denoiser(models["unet"], adapter)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    if {id(p) for p in trainable} != {id(p) for p in adapter.parameters()}:
        raise RuntimeError("only the face adapter's parameters may train")  # a bug here, not a user error
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    # linear warm-up, then constant / cosine / linear decay over max_steps optimizer steps
    name = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps
    )
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    logger.info("adapter: %.2fM trainable parameters", sum(p.numel() for p in trainable) / 1e6)
    noise_gen = torch.Generator().manual_seed(config.seed + 1_000_003 * (accelerator.process_index + 1))
    return RunState(config, accelerator, denoiser, adapter, optimizer, scheduler, noise_gen)


# --- 3. data ------------------------------------------------------------------------------------------
def _preprocessor(config: TrainConfig, models: dict[str, Any], device: torch.device) -> data.Preprocessor:
    """The dataset cache's models: face detection + tokens as callables, VAE and text encoder."""
    from studio.config import DetectConfig
    from studio.faces.detect import align_crops, detect_faces

    settings = DetectConfig(
        threshold=config.det_threshold, det_size=config.det_size, min_face=config.min_face
    )
    detector, encoder = models["detector"], models["encoder"]
    return data.Preprocessor(
        find_faces=lambda image: detect_faces(image, detector, settings),
        encode_faces=lambda image, faces: encoder.encode(align_crops(image, faces)),
        vae=models["vae"],
        tokenizer=models["tokenizer"],
        text_encoder=models["text_encoder"],
        device=device,
        model_ids=models["model_ids"],
    )


# --- 4. sampling --------------------------------------------------------------------------------------
def _sampling(run: RunState, photos: list[Photo], num_timesteps: int) -> Iterator[dict[str, torch.Tensor]]:
    """This process's share of the ID-shuffle draws from the run's position, with noise and timesteps."""
    acc = run.accelerator
    loader = data.make_loader(
        photos,
        run.config,
        rank=acc.process_index,
        world=acc.num_processes,
        start=run.samples,
        pin_memory=acc.device.type == "cuda",
    )
    return data.noised_batches(
        loader, run.noise_gen, num_timesteps, acc.device, overfit=run.config.overfit_one_batch
    )


# --- 5. the loop --------------------------------------------------------------------------------------
def _loop(
    run: RunState,
    batches: Iterator[dict[str, torch.Tensor]],
    models: dict[str, Any],
    val_photo: Photo | None,
) -> list[dict[str, float]]:
    """Optimizer steps up to max_steps, with progress, log lines, validation pictures and checkpoints."""
    from tqdm.auto import tqdm

    config, history = run.config, []
    bar = tqdm(
        total=config.max_steps, initial=run.step, desc="train", disable=not run.accelerator.is_main_process
    )
    start = time.perf_counter()
    while run.step < config.max_steps:
        stats = _train_step(run, batches, models["noise_scheduler"])
        run.step += 1
        history.append({"step": run.step, **stats})
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", mse=f"{stats['mse']:.4f}", pen=f"{stats['penalty']:.2e}")
        last = run.step == config.max_steps
        if run.step % config.log_every == 0 or last:
            rate = (time.perf_counter() - start) / max(len(history), 1)
            logger.info(
                "step %d %s (%.2f s/step)", run.step, " ".join(f"{k} {v:.4g}" for k, v in stats.items()), rate
            )
        # 6. validation pictures for the held-out identity (and at the end)
        if val_photo is not None and (run.step % config.eval_every == 0 or last):
            _validate(run, models, val_photo)
        # 7. checkpoints (always one at the end)
        if run.step % config.save_every == 0 or last:
            ckpt.save_checkpoint(run)
    bar.close()
    return history


def _train_step(
    run: RunState, batches: Iterator[dict[str, torch.Tensor]], noise_scheduler: Any
) -> dict[str, float]:
    """grad_accum micro-batches, one optimizer and LR step; mean loss / mse / penalty over micro-batches."""
    sums = torch.zeros(3, device=run.accelerator.device)
    for _ in range(run.config.grad_accum):
        batch = next(batches)
        run.samples += run.config.batch_size  # draws consumed: the resume position
        with run.accelerator.accumulate(run.denoiser):
            latents, noise = batch["latents"], batch["noise"]
            timesteps = batch["timesteps"]
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            pred, incs = run.denoiser(noisy, timesteps, batch["text"], batch["tokens"], batch["embedding"])
            total, mse, penalty = fair_loss(pred, target, incs, batch["mask"], run.config.lam)
            run.accelerator.backward(total)
            if run.accelerator.sync_gradients:
                run.accelerator.clip_grad_norm_(run.adapter.parameters(), run.config.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([total, mse, penalty]).detach().float()
    run.scheduler.step()
    loss, mse, penalty = (sums / run.config.grad_accum).tolist()
    return {"loss": loss, "mse": mse, "penalty": penalty, "lr": run.scheduler.get_last_lr()[0]}


# --- 6. validation ------------------------------------------------------------------------------------
def _validate(run: RunState, models: dict[str, Any], photo: Photo) -> None:
    """Render num_val_images with the held-out face at scale 1; [reference | images] -> val/step_N.png."""
    config = run.config
    if run.accelerator.is_main_process:
        prompt = data.caption_for(photo.path, config.caption)
        images = _render_validation(run, models, photo, prompt)
        reference = data.centre_square(read_image(photo.path), config.resolution)
        row = np.concatenate([from_pil(im) for im in [reference, *images]], axis=1)  # [H, (n+1)W, 3] BGR
        settings = {"Steps": config.val_steps, "CFG scale": config.val_cfg, "Seed": config.seed}
        settings |= {"Face": photo.person, "Adapter step": run.step, "Face scale": 1.0}
        path = write_image(
            config.out_dir / "val" / f"step_{run.step}.png",
            row,
            parameters=format_parameters(prompt, "", settings),
        )
        logger.info("validation pictures: %s (reference face first)", path)
    run.accelerator.wait_for_everyone()


def _render_validation(run: RunState, models: dict[str, Any], photo: Photo, prompt: str) -> list[Image.Image]:
    """num_val_images pictures of ``prompt`` steered by ``photo``'s face (the training RNG is untouched)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    config, core = run.config, run.accelerator.unwrap_model(run.denoiser)
    pipe = StableDiffusionPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=models["tokenizer"],
        unet=core.unet,
        scheduler=DDIMScheduler.from_config(models["noise_scheduler"].config, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    face, n = data.read_cached(photo.cache), config.num_val_images
    device = run.accelerator.device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), run.accelerator.autocast():
        kwargs = core.adapter.face_kwargs(
            face["tokens"][None], face["embedding"][None], scale=1.0, cfg=config.val_cfg > 1
        )
        return pipe(
            prompt,
            num_images_per_prompt=n,
            num_inference_steps=config.val_steps,
            guidance_scale=config.val_cfg,
            height=config.resolution,
            width=config.resolution,
            generator=[torch.Generator().manual_seed(config.seed + k) for k in range(n)],
            cross_attention_kwargs=kwargs,
        ).images


# ----------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``train_adapter.py CONFIG [--resume [latest|PATH]] [--set key=value ...]``."""
    parser = argparse.ArgumentParser(
        description="Train the FACT face adapter.",
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:3]),  # the run commands
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="configs/train_*.toml")
    parser.add_argument(
        "--resume", nargs="?", const="latest", help="a ckpt/step_N folder, or latest (default)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    args = parser.parse_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0  # set by accelerate launch / torchrun
    level = logging.INFO if main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    try:
        train(load_train_config(args.config, args.set), resume=args.resume)
    except StudioError as err:
        logger.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted: resume from the last checkpoint with --resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
