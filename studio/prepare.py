"""How a generate request becomes a draft request: style → template → LoRAs → pose → init image.

Precedence for every setting: the request (command line) > the style preset > the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.config import StudioConfig
from studio.draft.pose import load_pose
from studio.draft.request import ControlSpec, DraftRequest, FaceCondition
from studio.errors import ContentBlockedError, ModelError
from studio.files import sha256_file
from studio.imageio import read_image
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue
from studio.models.resolve import resolve
from studio.prompts import check_prompt, fill_template
from studio.request import GenerateRequest
from studio.safety import prompt_check
from studio.styles import StylePreset, load_style
from studio.types import ImageBGR


def build_draft_request(
    request: GenerateRequest,
    catalogue: Catalogue,
    config: StudioConfig,
    cache: ModelCache,
    face: FaceCondition | None = None,
) -> tuple[DraftRequest, dict[str, Any]]:
    """The draft request, and the input files it used (path + sha256, for the recipe)."""
    style = load_style(request.style) if request.style else None
    text = style.prompt.replace("{prompt}", request.prompt) if style else request.prompt
    pick = _Precedence(style, config)
    negative = request.negative if request.negative is not None else pick("negative")
    width = request.width or pick("width")
    height = request.height or pick("height")
    style_loras = tuple((lo.name, lo.weight) for lo in style.loras) if style else ()
    loras = tuple((resolve(n, "lora", config, catalogue), w) for n, w in style_loras + request.loras)
    inputs: dict[str, Any] = {}
    prompt, negative = fill_template(text, request.variables), fill_template(negative, request.variables)
    check_prompt(prompt)  # unsupported A1111 syntax fails before any model loads
    check_prompt(negative)
    blocked = prompt_check(prompt, config.safety.blocked_terms)
    if blocked:
        raise ContentBlockedError(
            f"The prompt is blocked by the content check: {'; '.join(blocked)}.",
            fix="rephrase the prompt (the blocked terms are safety.blocked_terms).",
        )
    draft = DraftRequest(
        prompt=prompt,
        negative=negative,
        seed=request.seed,
        count=request.count,
        width=width,
        height=height,
        steps=request.steps or pick("steps"),
        cfg=request.cfg if request.cfg is not None else pick("cfg"),
        sampler=request.sampler or pick("sampler"),
        batch_size=request.batch_size,
        loras=loras,
        init_image=_init_image(request.init_image, config, inputs),
        strength=request.strength,
        control=_control(request, width, height, catalogue, config, cache, inputs),
        face=face,
    )
    return draft, inputs


def _init_image(path: Path | None, config: StudioConfig, inputs: dict[str, Any]) -> ImageBGR | None:
    if path is None:
        return None
    image = read_image(path, max_pixels=config.images.max_pixels)  # first: a missing file is an ImageError
    inputs["init_image"] = {"path": str(path), "sha256": sha256_file(path)}
    return image


def _control(
    request: GenerateRequest,
    width: int,
    height: int,
    catalogue: Catalogue,
    config: StudioConfig,
    cache: ModelCache,
    inputs: dict[str, Any],
) -> ControlSpec | None:
    if request.pose is None:
        return None
    model = resolve(request.control_model or config.draft.controlnet, "controlnet", config, catalogue)
    image = load_pose(
        request.pose,
        width=width,
        height=height,
        max_pixels=config.images.max_pixels,
        detector_dir=lambda: _annotator_folder(config, catalogue),  # only a photo needs the annotator
        source=request.pose_source,
        cache=cache,
    )
    inputs["pose"] = {
        "path": str(request.pose),
        "sha256": sha256_file(request.pose),
        "source": request.pose_source,
    }
    return ControlSpec(model, image, request.control_scale, request.control_start, request.control_end)


ANNOTATOR_FILES = ("openpose_body", "openpose_hand", "openpose_face")


def _annotator_folder(config: StudioConfig, catalogue: Catalogue) -> Path:
    """The folder holding the three catalogued OpenPose files (checked, licence applied)."""
    paths = [resolve(name, "annotator", config, catalogue).path for name in ANNOTATOR_FILES]
    folders = {p.parent for p in paths}
    if len(folders) != 1:
        found = ", ".join(sorted(map(str, folders)))
        raise ModelError(
            f"The OpenPose files must sit in one folder; found them in {found}.",
            fix=f"move them together, or run `studio models pull {' '.join(ANNOTATOR_FILES)}`.",
        )
    return folders.pop()


class _Precedence:
    """A draft setting by precedence: (the request, by the caller) > --set/--config > style > profile.

    With ``draft.cap_styles`` (tiny) a style cannot raise width, height or steps above the profile.
    """

    _CAPPED = ("width", "height", "steps")

    def __init__(self, style: StylePreset | None, config: StudioConfig) -> None:
        self.style, self.config = style, config

    def __call__(self, key: str) -> Any:
        ours = getattr(self.config.draft, key)
        if self.style is None or f"draft.{key}" in self.config.explicit_keys:
            return ours
        theirs = getattr(self.style, key)
        if self.config.draft.cap_styles and key in self._CAPPED:
            return min(theirs, ours)
        return theirs
