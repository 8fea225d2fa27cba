"""A1111 fidelity of the ``parameters`` text: sampler, schedule type, LoRA tags and hashes, read three ways.

1. studio's own reader (``studio.imageio.parse_parameters``) recovers every field;
2. AUTOMATIC1111's own reading rules, restated here from its source (modules/infotext_utils.py
   ``re_param_code``, sd_samplers.py ``get_sampler_and_scheduler``, extensions-builtin/Lora
   ``infotext_pasted`` and ``hashes.addnet_hash_safetensors``), accept it as A1111 would;
3. sd-parsers, an independent reader, in its own interpreter: set STUDIO_SD_PARSERS_PYTHON to a Python
   that has it (``uv venv /tmp/sdp && uv pip install --python /tmp/sdp/bin/python sd-parsers``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from studio.config import load_config
from studio.imageio import parse_parameters, read_metadata, write_image
from studio.infotext import A1111_SAMPLERS, a1111_hash, a1111_parameters
from studio.pipeline import Studio
from studio.recipe import DraftRecord, Recipe
from studio.request import GenerateRequest
from studio.types import SAMPLERS

SD_PARSERS_PYTHON = os.environ.get("STUDIO_SD_PARSERS_PYTHON")
MODEL_SHA = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
LORAS = (
    {"name": "film-look.safetensors", "sha256": "a" * 64, "weight": 0.75, "a1111_hash": "0123456789abcdef"},
    {"name": "ink", "sha256": "b" * 64, "weight": 1.0, "a1111_hash": "fedcba9876543210" + "0" * 48},
    {"name": "old-recipe", "sha256": "c" * 64, "weight": 0.5},  # recorded before a1111_hash existed
)
EXPECTED = (
    "portrait of a woman, (film grain:1.2) <lora:film-look:0.75> <lora:ink:1> <lora:old-recipe:0.5>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 512x768, "
    'Model hash: 6ce0161689, Model: sd15, Lora hashes: "film-look: 0123456789ab, ink: fedcba987654"'
)

# A1111 modules/infotext_utils.py, unchanged
RE_PARAM_CODE = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
RE_PARAM = re.compile(RE_PARAM_CODE)
RE_LORA = re.compile("<lora:([^:]+):")  # extensions-builtin/Lora/lora_script.py
# modules/sd_schedulers.py labels, names and aliases, in A1111's order
A1111_SCHEDULES = [
    ("Automatic", "automatic"),
    ("Uniform", "uniform"),
    ("Karras", "karras"),
    ("Exponential", "exponential"),
    ("Polyexponential", "polyexponential"),
    ("SGM Uniform", "sgm_uniform", "SGMUniform"),
    ("KL Optimal", "kl_optimal"),
    ("Align Your Steps", "align_your_steps"),
    ("Simple", "simple"),
    ("Normal", "normal"),
    ("DDIM", "ddim"),
    ("Beta", "beta"),
]
# modules/sd_samplers_kdiffusion.py (>= 1.9): a sampler's default schedule, which "Automatic" means
A1111_DEFAULT_SCHEDULE = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential"}


def _recipe(sampler: str = "DPM++ 2M Karras", loras: tuple[dict, ...] = LORAS) -> Recipe:
    draft = DraftRecord(
        prompt="portrait of a woman, (film grain:1.2)",
        negative="blurry, lowres",
        seed=42,
        batch_seeds=(42,),
        width=512,
        height=768,
        steps=30,
        cfg=7.0,
        sampler=sampler,
        model={"label": "sd15.safetensors", "family": "sd15", "sha256": MODEL_SHA},
        loras=loras,
    )
    return Recipe(request={}, config={}, models={}, draft=draft)


def _a1111_read(text: str) -> tuple[str, dict[str, str]]:
    """A1111's parse_generation_parameters, reduced to prompt and settings."""
    *lines, last = text.strip().split("\n")
    settings = {}
    for key, value in RE_PARAM.findall(last):
        if value[0] == '"' and value[-1] == '"':
            value = json.loads(value)  # A1111's unquote
        settings[key] = value
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt:"))
    return prompt, settings


def _a1111_split(name: str) -> tuple[str, str]:
    """A1111 >= 1.9 get_sampler_and_scheduler(name, None, convert_automatic=False): a legacy name's parts."""
    for label, *aliases in A1111_SCHEDULES:
        for option in (label, *aliases):
            if name.endswith(" " + option):
                return name[: -(len(option) + 1)], label
    return name, "Automatic"


def _a1111_reference_hash(path: Path) -> str:
    """A1111's LoRA hash, restated: sshs_model_hash, else sha256 of the bytes after the header."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + length]).get("__metadata__", {})
    return metadata.get("sshs_model_hash") or hashlib.sha256(data[8 + length :]).hexdigest()


# ---------------------------------------------------------------- the text itself


def test_infotext_is_written_as_a1111_1_9_writes_it() -> None:
    text = a1111_parameters(_recipe())
    assert text == EXPECTED
    assert _recipe().draft is not None and "<lora:" not in _recipe().draft.prompt  # the recipe stays clean


def test_studio_reader_recovers_every_field() -> None:
    prompt, negative, settings = parse_parameters(a1111_parameters(_recipe()) or "")
    assert (
        prompt
        == "portrait of a woman, (film grain:1.2) <lora:film-look:0.75> <lora:ink:1> <lora:old-recipe:0.5>"
    )
    assert negative == "blurry, lowres"
    assert settings == {
        "Steps": "30",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.0",
        "Seed": "42",
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "sd15",
        "Lora hashes": "film-look: 0123456789ab, ink: fedcba987654",
    }


def test_a1111_reader_finds_every_lora_by_hash() -> None:
    prompt, settings = _a1111_read(a1111_parameters(_recipe()) or "")
    assert settings["Sampler"] == "DPM++ 2M" and settings["Schedule type"] == "Karras"
    assert settings["Model hash"] == "6ce0161689"
    # lora_script.infotext_pasted: "name: hash" pairs, looked up by the alias in each <lora:alias: tag
    pairs = [item.strip().split(":", 1) for item in settings["Lora hashes"].split(",")]
    hashes = {name.strip(): short.strip() for name, short in pairs}
    assert hashes == {"film-look": "0123456789ab", "ink": "fedcba987654"}
    assert RE_LORA.findall(prompt) == ["film-look", "ink", "old-recipe"]  # old-recipe: no hash recorded


def test_lora_names_lose_what_the_infotext_cannot_carry() -> None:
    odd = ({"name": "a:b, c<d>.safetensors", "sha256": "d" * 64, "weight": 0.3, "a1111_hash": "9" * 64},)
    prompt, settings = _a1111_read(a1111_parameters(_recipe(loras=odd)) or "")
    assert prompt.endswith(" <lora:ab cd:0.3>")
    assert settings["Lora hashes"] == "ab cd: 999999999999"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_pastes_into_a1111_as_the_same_sampler(sampler: str) -> None:
    _, settings = _a1111_read(a1111_parameters(_recipe(sampler, ())) or "")
    written = (settings["Sampler"], settings["Schedule type"])
    assert written == A1111_SAMPLERS[sampler]  # type: ignore[index]
    legacy = _a1111_split(sampler)
    if sampler == "DPM++ 2M":  # before 1.9: the model's uniform sigmas; since 1.9 "Automatic" means Karras
        assert legacy == ("DPM++ 2M", "Automatic") and written == ("DPM++ 2M", "Uniform")
    else:
        assert written == legacy
        assert A1111_DEFAULT_SCHEDULE.get(written[0], "Karras") != "Automatic"


def test_a_sampler_studio_no_longer_offers_is_written_in_its_legacy_form() -> None:
    _, settings = _a1111_read(a1111_parameters(_recipe("DPM++ SDE Karras", ())) or "")
    assert settings["Sampler"] == "DPM++ SDE Karras" and "Schedule type" not in settings


# ---------------------------------------------------------------- LoRA hashes


def _lora_file(path: Path, metadata: dict[str, str] | None = None) -> Path:
    tensors = {"lora_unet_x.lora_down.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a1111_hash_is_the_addnet_hash_of_the_tensor_bytes(tmp_path: Path) -> None:
    path = _lora_file(tmp_path / "style.safetensors", {"ss_output_name": "style"})
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    got = a1111_hash(path, sha)
    assert got == _a1111_reference_hash(path) and got != sha
    # the header (metadata) is not hashed: the same tensors with other metadata hash the same
    other = _lora_file(tmp_path / "renamed.safetensors", {"ss_output_name": "renamed", "note": "x"})
    assert a1111_hash(other, hashlib.sha256(other.read_bytes()).hexdigest()) == got


def test_a1111_hash_prefers_the_kohya_model_hash(tmp_path: Path) -> None:
    path = _lora_file(tmp_path / "kohya.safetensors", {"sshs_model_hash": "feedface" * 8})
    assert a1111_hash(path, hashlib.sha256(path.read_bytes()).hexdigest()) == "feedface" * 8


def test_a1111_hash_of_other_files_and_folders(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"not read")
    assert a1111_hash(legacy, "e" * 64) == "e" * 64  # A1111 hashes the whole file: its sha256
    assert a1111_hash(tmp_path, "f" * 64) is None  # a diffusers folder has no A1111 hash


def test_generated_image_names_its_lora_by_a1111_hash(tiny_kit: Path, tiny_overrides: list[str]) -> None:
    studio = Studio(load_config("tiny", overrides=tiny_overrides))
    request = GenerateRequest(
        prompt="a keeper", negative="", seed=3, count=1, width=64, height=64, steps=1, cfg=5.0,
        sampler="DPM++ 2M Karras", loras=(("tiny-style-kohya", 0.8),),
    )  # fmt: skip
    [output] = studio.generate(request).outputs
    meta = read_metadata(output)
    prompt, settings = _a1111_read(meta.parameters or "")
    [name] = RE_LORA.findall(prompt)
    assert prompt == f"a keeper <lora:{name}:0.8>"
    assert (
        settings["Lora hashes"]
        == f"{name}: {_a1111_reference_hash(tiny_kit / 'loras' / 'tiny-style-kohya.safetensors')[:12]}"
    )
    assert meta.recipe is not None and meta.recipe["draft"]["prompt"] == "a keeper"


# ---------------------------------------------------------------- sd-parsers, in its own interpreter

_SD_PARSERS_SCRIPT = """
import json, sys
from sd_parsers import ParserManager
info = ParserManager().parse(sys.argv[1])
print(json.dumps({
    "generator": info.generator.value,
    "samplers": [
        {
            "name": s.name,
            "parameters": s.parameters,
            "model": None if s.model is None else {"name": s.model.name, "hash": s.model.hash},
            "prompts": [p.value for p in s.prompts],
            "negative_prompts": [p.value for p in s.negative_prompts],
        }
        for s in info.samplers
    ],
}))
"""


@pytest.mark.skipif(
    not SD_PARSERS_PYTHON,
    reason="set STUDIO_SD_PARSERS_PYTHON to a Python with sd-parsers installed (kept out of studio's "
    "dependencies): uv venv /tmp/sdp && uv pip install --python /tmp/sdp/bin/python sd-parsers",
)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sd_parsers_reads_our_png(tmp_path: Path, sampler: str) -> None:
    text = a1111_parameters(_recipe(sampler))
    path = write_image(tmp_path / "out.png", np.zeros((8, 8, 3), np.uint8), parameters=text)
    run = subprocess.run(
        [str(SD_PARSERS_PYTHON), "-c", _SD_PARSERS_SCRIPT, str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["generator"] == "AUTOMATIC1111"
    [parsed] = found["samplers"]
    a1111_sampler, schedule = A1111_SAMPLERS[sampler]  # type: ignore[index]
    assert parsed["name"] == a1111_sampler
    assert parsed["parameters"] == {"scheduler": schedule, "cfg_scale": "7.0", "seed": "42", "steps": "30"}
    assert parsed["model"] == {"name": "sd15", "hash": "6ce0161689"}
    assert parsed["prompts"] == [EXPECTED.split("\n")[0]]
    assert parsed["negative_prompts"] == ["blurry, lowres"]
    # sd-parsers splits settings on every ',' and ':' (quoted values included), so it cannot read
    # "Lora hashes"; the A1111-rule test above checks that field.
