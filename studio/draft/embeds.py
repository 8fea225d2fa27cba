"""Prompt text → diffusers conditioning with compel: A1111 weights, BREAK, long prompts.

``PromptEncoder`` (one per base model, with its caches; ``encode_prompts`` for a one-off) feeds the
fragments of ``studio.prompts.parse_prompt`` to compel's ``EmbeddingsProvider`` (never through compel's own
syntax), encodes every ``BREAK`` segment in its own 77-token windows, and pads positives, negatives and every
row of the batch to one length with the empty-prompt window, as A1111 does.

Weighting numerics are compel's, not A1111's: a token weighted ``w >= 1`` becomes
``empty + w * (z - empty)`` at its own position, with no mean restoration afterwards; a token weighted
``w < 1`` gets that scaling *and* a blend towards an encoding with the token masked out (blend weight
``tan((1 - w) * pi / 2)``, so ``0.5`` is half-way), which also moves the tokens after it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from compel import EmbeddingsProvider, ReturnedEmbeddingsType, SplitLongTextMode
from diffusers import DiffusionPipeline

from studio.errors import InputError, ModelError
from studio.models.cache import Recent
from studio.prompts import COMMA_BACKTRACK, Fragment, parse_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptEmbeddings:
    """Conditioning tensors for a diffusers pipeline call, one row per image."""

    prompt_embeds: torch.Tensor  # [B, 77*k, C]
    negative_prompt_embeds: torch.Tensor  # [B, 77*k, C]
    pooled_prompt_embeds: torch.Tensor | None = None  # [B, P] (SDXL)
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # [B, P] (SDXL)

    def as_pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        """The non-None tensors under the diffusers pipeline argument names."""
        kwargs = {
            "prompt_embeds": self.prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": self.negative_pooled_prompt_embeds,
        }
        return {name: tensor for name, tensor in kwargs.items() if tensor is not None}


class _A1111WindowProvider(EmbeddingsProvider):
    """compel's provider with A1111's window split, so unweighted long prompts match A1111.

    compel splits at the last sentence/phrase mark anywhere in the window; A1111 splits after the last
    comma only when it lies within ``COMMA_BACKTRACK`` tokens of the window's end, else at 75 tokens.
    Overriding compel's one split hook is the single place this behaviour changes.
    """

    def _find_next_best_split_point(
        self, token_ids: list[int], max_length: int, *args: object, **kwargs: object
    ) -> int:
        if len(token_ids) <= max_length:
            return max_length
        comma = self.tokenizer.convert_tokens_to_ids(",</w>")
        for index in range(max_length - 1, max(max_length - 1 - COMMA_BACKTRACK, -1), -1):
            if token_ids[index] == comma:
                return index + 1
        return max_length


def encode_prompts(
    pipe: DiffusionPipeline, prompts: Sequence[str], negatives: Sequence[str]
) -> PromptEmbeddings:
    """Encode one prompt and one negative per image into diffusers ``prompt_embeds`` arguments (one-off:
    a ``DraftPipeline`` keeps a ``PromptEncoder``, whose caches make repeated prompts free)."""
    return PromptEncoder().encode(pipe, prompts, negatives)


@dataclass(frozen=True)
class _Providers:
    """compel providers of one pipeline's text encoders, and where and in what dtype they run."""

    rows: list[EmbeddingsProvider]
    pooled: EmbeddingsProvider | None
    dtype: torch.dtype
    device: torch.device


class PromptEncoder:
    """Prompt encoding for one base model: compel providers built once per text-encoder set, and each
    distinct text encoded once per text-encoder state (LRU).

    ``state`` names what else changes the text encoders' output: the active LoRA set and weights (a LoRA may
    patch the text encoder). Each text is encoded alone, so a row's embedding does not depend on the batch it
    is in: cached, batched and one-off encodings are the same tensors.
    """

    def __init__(self, capacity: int = 64) -> None:
        # providers per (text-encoder set, state): compel keeps each provider's empty-prompt embedding (the
        # padding and the base of weighted tokens), which a LoRA on the text encoder changes too
        self._providers = Recent(8)
        self._rows = Recent(capacity)  # (encoders, state, text) -> ([1, 77*k, C] row, [1, P] pooled | None)

    def encode(
        self,
        pipe: DiffusionPipeline,
        prompts: Sequence[str],
        negatives: Sequence[str],
        state: Hashable = (),
    ) -> PromptEmbeddings:
        """One prompt and one negative per image → diffusers ``prompt_embeds`` arguments."""
        # 1. check inputs; one negative may serve the whole batch
        negatives = _normalize_batch(prompts, negatives)
        texts = [*prompts, *negatives]
        # 2. each distinct text once (cached per text-encoder state), then every row of the batch
        encoders, providers = self._providers_for(pipe, state)
        encoded = {t: self._row(providers, t, (encoders, state, t)) for t in dict.fromkeys(texts)}
        with torch.no_grad():
            window = torch.cat([p.empty_z.to(providers.device) for p in providers.rows], dim=-1)  # [1, 77, C]
            embeds = _pad_rows([encoded[t][0] for t in texts], window)  # [2B, 77*k, C]
            embeds = embeds.to(device=providers.device, dtype=providers.dtype)
            pooled = None
            if providers.pooled is not None:
                pooled = torch.cat([encoded[t][1] for t in texts], dim=0)  # type: ignore[misc]  # [2B, P]
        batch = len(prompts)
        logger.debug(
            "encoded %d prompts + negatives (%d distinct) to %s", batch, len(encoded), tuple(embeds.shape)
        )
        return PromptEmbeddings(
            prompt_embeds=embeds[:batch],
            negative_prompt_embeds=embeds[batch:],
            pooled_prompt_embeds=None if pooled is None else pooled[:batch],
            negative_pooled_prompt_embeds=None if pooled is None else pooled[batch:],
        )

    def _providers_for(self, pipe: DiffusionPipeline, state: Hashable) -> tuple[tuple[int, ...], _Providers]:
        """``pipe``'s text-encoder set (pipeline variants share it) and its providers under ``state``."""
        parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
        encoders = tuple(id(getattr(pipe, name, None)) for name in parts)
        providers = self._providers.get((encoders, state))
        if providers is None:
            providers = self._providers.put((encoders, state), _prepare_providers(pipe))
        return encoders, providers

    def _row(
        self, providers: _Providers, text: str, key: Hashable
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``text``'s ``[1, 77*k, C]`` embedding (and SDXL ``[1, P]`` pooled), kept under ``key``."""
        found = self._rows.get(key)
        if found is not None:
            return found
        parsed = parse_prompt(text)
        with torch.no_grad():
            row = _forward_segments(providers.rows, parsed, providers.device)
            pooled = _forward_pooled(providers.pooled, [parsed], providers.device, providers.dtype)
        return self._rows.put(key, (row, pooled))


def _normalize_batch(prompts: Sequence[str], negatives: Sequence[str]) -> list[str]:
    """Check batch sizes and return one negative per prompt."""
    for name, texts in (("prompts", prompts), ("negatives", negatives)):
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError(
                f"{name} must be a list of strings, got {type(texts).__name__} {texts!r:.80}.",
                fix=f"pass {name} as a list, e.g. [{'a portrait'!r}].",
            )
    if not prompts:
        raise InputError(
            "No prompts were given; expected one prompt per image.", fix="pass at least one prompt."
        )
    if len(negatives) == 1:
        return list(negatives) * len(prompts)
    if len(negatives) != len(prompts):
        raise InputError(
            f"Got {len(prompts)} prompts but {len(negatives)} negative prompts; expected one negative "
            "per prompt, or a single negative for all.",
            fix="pass as many negatives as prompts, or exactly one.",
        )
    return list(negatives)


def _prepare_providers(pipe: DiffusionPipeline) -> _Providers:
    """Providers for SD 1.5/2.x (one encoder) or SDXL (both, penultimate, pooled from the second)."""
    first = (getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None))
    second = (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))
    if (first[0] is None or first[1] is None) and (second[0] is None or second[1] is None):
        raise ModelError(
            f"{type(pipe).__name__} has no CLIP tokenizer/text_encoder pair; expected an SD 1.5/2.x "
            "(tokenizer, text_encoder) or SDXL (plus tokenizer_2, text_encoder_2) pipeline.",
            fix="load a Stable Diffusion 1.5 or SDXL base model.",
        )
    device = pipe._execution_device  # follows accelerate offload hooks, unlike pipe.device (read once)
    if second[0] is not None and second[1] is not None:
        # SDXL, as compel's CompelForSDXL: penultimate hidden states, not layer-normed, side by side
        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        pairs = [pair for pair in (first, second) if pair[0] is not None and pair[1] is not None]
        providers = [_make_provider(tok, enc, kind, device) for tok, enc in pairs]
        return _Providers(providers, providers[-1], second[1].dtype, device)
    kind = ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
    return _Providers([_make_provider(first[0], first[1], kind, device)], None, first[1].dtype, device)


def _make_provider(
    tokenizer: object, encoder: torch.nn.Module, kind: ReturnedEmbeddingsType, device: torch.device
) -> EmbeddingsProvider:
    """One compel provider that chunks instead of truncating and never copies CLS tokens across windows."""
    return _A1111WindowProvider(
        tokenizer=tokenizer,
        text_encoder=encoder,
        truncate=False,
        returned_embeddings_type=kind,
        device=device,
        split_long_text_mode=SplitLongTextMode.BRUTAL,  # no CLS copy/merge flags: windows stay independent
    )


def _forward_segments(
    providers: list[EmbeddingsProvider], segments: list[list[Fragment]], device: torch.device
) -> torch.Tensor:
    """Encode each BREAK segment in its own windows and join them: ``[1, 77*k, C]``."""
    encoded = []
    for segment in segments:
        parts = [_forward_fragments(provider, segment, device) for provider in providers]  # [1, 77*k_j, C_j]
        longest = max(part.shape[1] for part in parts)
        windows = [provider.empty_z.to(device) for provider in providers]  # [1, 77, C_j]
        parts = [_pad_to(part, window, longest) for part, window in zip(parts, windows, strict=True)]
        encoded.append(torch.cat(parts, dim=-1))  # [1, 77*k, C_1 (+ C_2)]
    return torch.cat(encoded, dim=1)  # [1, 77*k_total, C]


def _forward_fragments(
    provider: EmbeddingsProvider, segment: list[Fragment], device: torch.device
) -> torch.Tensor:
    """Weighted compel embeddings of one segment's fragments: ``[1, 77*k, C]``."""
    texts = [fragment.text for fragment in segment]
    token_ids = provider.get_token_ids(texts, include_start_and_end_markers=False)
    # compel cannot locate a token-less fragment (e.g. whitespace) to down-weight it; it adds nothing anyway
    kept = [fragment for fragment, ids in zip(segment, token_ids, strict=True) if ids]
    # an empty list would reach the tokenizer as an empty batch, which transformers 5 rejects
    kept = kept or [Fragment("", 1.0)]
    return provider.get_embeddings_for_weighted_prompt_fragments(
        text_batch=[[fragment.text for fragment in kept]],
        fragment_weights_batch=[[fragment.weight for fragment in kept]],
        device=device,
    )


def _pad_rows(rows: list[torch.Tensor], window: torch.Tensor) -> torch.Tensor:
    """Stack ``[1, L_i, C]`` rows into ``[N, L_max, C]`` by appending empty-prompt windows."""
    longest = max(row.shape[1] for row in rows)
    return torch.cat([_pad_to(row, window, longest) for row in rows], dim=0)


def _pad_to(row: torch.Tensor, window: torch.Tensor, length: int) -> torch.Tensor:
    """Append copies of ``window`` (``[1, W, C]``) to ``row`` (``[1, L, C]``) until it is ``length`` long."""
    copies = (length - row.shape[1]) // window.shape[1]
    return torch.cat([row, window.to(row.dtype).repeat(1, copies, 1)], dim=1)  # [1, length, C]


def _forward_pooled(
    provider: EmbeddingsProvider | None,
    parsed: list[list[list[Fragment]]],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """SDXL pooled embeddings ``[N, P]`` of each prompt's first segment, unweighted, as A1111."""
    if provider is None:
        return None
    texts = ["".join(fragment.text for fragment in segments[0]) for segments in parsed]
    pooled = provider.get_pooled_embeddings(texts, device=device)  # [N, P], first 77 tokens
    return pooled.to(device=device, dtype=dtype)
