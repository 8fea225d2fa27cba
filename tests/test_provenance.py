"""Every output marked, signed and audited (the tiny profile with every mark on), and verified back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data
from typer.testing import CliRunner

from studio.audit import AuditLog
from studio.cli.main import app
from studio.config import load_config
from studio.errors import IdentityError, StudioError
from studio.faces.consent import ConsentTerms
from studio.imageio import read_image, write_image
from studio.pipeline import Studio
from studio.request import GenerateRequest
from studio.verify import verify_image
from tests.conftest import UNMARKED

FAST = {"steps": 2}


@pytest.fixture
def marked(tiny_overrides: list[str], tmp_path: Path) -> list[str]:
    """The tiny profile's own marks (watermark and C2PA on), private identities, log and CA."""
    overrides = [o for o in tiny_overrides if o not in UNMARKED]
    return [*overrides, f"refine.identities_dir={str(tmp_path / 'ids')!r}"]


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    write_image(path, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
    return path


def _cli(overrides: list[str], *args: str) -> tuple[int, str]:
    options = [part for item in overrides for part in ("--set", item)]
    result = CliRunner().invoke(app, [*args, "--profile", "tiny", *options])
    if isinstance(result.exception, StudioError):  # what studio.cli.main.main turns into its exit code
        return result.exception.exit_code, f"{result.output}error: {result.exception}"
    return result.exit_code, result.output


def test_a_fresh_output_is_signed_watermarked_and_audited(marked: list[str], photo: Path) -> None:
    config = load_config("tiny", overrides=marked)
    studio = Studio(config)
    studio.enrol("anna", [photo], consent=ConsentTerms("release #1", ("internal", "ads")))
    (path,) = studio.generate(GenerateRequest("a portrait", identity="anna", **FAST)).outputs
    code, text = _cli(marked, "verify", str(path))
    assert code == 0, text
    assert "C2PA: valid-untrusted" in text and "local CA" in text
    assert "watermark: dwtDctSvd watermark of this file's recipe" in text
    assert "verdict: signed, watermarked and audited" in text
    check = verify_image(path, config)
    manifest = check.credentials.manifest or {}
    assert [a["action"] for a in manifest["actions"]][-1] == "c2pa.edited"  # drafted, then refined
    assert manifest["recipe"]["identities"] == {"anna": check.recipe.refine.identities["anna"]}  # type: ignore[union-attr]
    assert manifest["thumbnails"] == []
    events = [(e.event, sorted(e.identities)) for e in AuditLog(config.audit.log).entries()]
    assert events == [("enrol", ["anna"]), ("output", ["anna"])]
    code, text = _cli(marked, "audit", "show", "--identity", "anna")
    assert code == 0 and text.count("anna (") == 2 and "purpose=internal" in text


def test_a_changed_pixel_invalidates_and_a_cut_log_is_caught(marked: list[str], tmp_path: Path) -> None:
    config = load_config("tiny", overrides=marked)
    first, second = Studio(config).generate(GenerateRequest("a portrait", count=2, **FAST)).outputs
    # one pixel byte changed, everything else (chunks, manifest) kept: the signature no longer holds
    raw = bytearray(second.read_bytes())
    image = read_image(second)
    image[10, 10, 0] ^= 0x01
    from studio.imageio import encode_png

    tampered = tmp_path / "tampered.png"
    tampered.write_bytes(_with_manifest(encode_png(image), bytes(raw)))
    assert verify_image(tampered, config).credentials.state == "invalid"
    # the log cut back to before the second output: its credentials name an entry that is gone
    log = config.audit.log
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("")
    code, text = _cli(marked, "audit", "verify", "--against", str(second))
    assert code == 10 and "lacks entry" in text
    log.write_text("".join(lines))
    assert _cli(marked, "audit", "verify", "--against", str(first), "--against", str(second))[0] == 0


def test_turning_marks_off_is_recorded_and_a_label_is_visible(marked: list[str]) -> None:
    config = load_config("tiny", overrides=[*marked, *UNMARKED, "provenance.label=true"])
    result = Studio(config).generate(GenerateRequest("a portrait", **FAST))
    assert any("turned off by configuration" in note for note in result.notes)
    (entry,) = AuditLog(config.audit.log).entries()
    assert entry.data["marks_off"] == ["watermark", "c2pa"] and entry.data["label"] is True
    check = verify_image(result.outputs[0], config)
    assert check.credentials.state == "absent" and not check.watermarked and not check.ok
    corner = read_image(result.outputs[0])[-8:, -30:]  # bottom-right: white text on a darkened box
    assert corner.max() >= 200 and np.median(corner) < 90


def test_an_identity_is_used_only_within_its_consent(marked: list[str], photo: Path) -> None:
    config = load_config("tiny", overrides=marked)
    Studio(config).enrol("kenji", [photo], consent=ConsentTerms("release #2", ("concept-art",)))
    with pytest.raises(IdentityError, match=r"may be used for concept-art .* not for 'internal'"):
        Studio(config).generate(GenerateRequest("a portrait", identity="kenji", **FAST))
    art = Studio(replace(config, consent=replace(config.consent, purpose="concept-art")))
    assert len(art.generate(GenerateRequest("a portrait", identity="kenji", **FAST)).outputs) == 1
    entry = AuditLog(config.audit.log).entries("kenji")[-1]
    assert entry.event == "output" and entry.data["purpose"] == "concept-art"
    assert "embedding" not in json.dumps(entry.data)


def _with_manifest(png: bytes, signed: bytes) -> bytes:
    """``png`` with the C2PA chunk (caBX) of ``signed`` put back where c2pa puts it (after IHDR)."""
    chunk = _chunk(signed, b"caBX")
    ihdr_end = 8 + 25  # signature + IHDR (length, type, 13 bytes, CRC)
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _chunk(png: bytes, kind: bytes) -> bytes:
    at = 8
    while at < len(png):
        length = int.from_bytes(png[at : at + 4], "big")
        if png[at + 4 : at + 8] == kind:
            return png[at : at + 12 + length]
        at += 12 + length
    raise AssertionError(f"no {kind!r} chunk")


# --- content checks: on the draft before refine and on the final image; a blocked picture is never written


def test_a_blocked_draft_is_not_refined_written_or_blackened(marked: list[str], photo: Path) -> None:
    config = load_config("tiny", overrides=[*marked, *UNMARKED])
    seen: list[float] = []

    def strict(image: np.ndarray) -> tuple[str, ...]:  # blocks everything, scoring the mean brightness
        seen.append(float(image.mean()))
        return ("fixture: blocks every picture",)

    studio = Studio(config, content_check=strict)
    studio.enrol("anna", [photo], consent="release #1")
    result = studio.generate(GenerateRequest("a portrait", identity="anna", **FAST))
    assert result.outputs == () and result.failed_qa == () and len(result.blocked) == 1
    assert "refine" not in result.timings and len(seen) == 1  # checked once, on the draft; never refined
    assert not list(config.output_dir.glob("*.png")) and not list(config.output_dir.rglob("*.png"))
    entry = AuditLog(config.audit.log).entries()[-1]
    assert entry.event == "blocked" and entry.identities == {} and entry.data["reasons"]
    code, text = _cli([*marked, *UNMARKED, "safety.blocked_terms=['gore']"], "generate", "gore at dawn")
    assert code == 11 and "blocked by the content check" in text and "gore" in text


def test_the_nudenet_check_is_wired_from_the_config(marked: list[str], tmp_path: Path) -> None:
    pytest.importorskip("nudenet", reason="the safety extra (uv sync --extra safety) is not installed")
    from studio.safety import NudeNetCheck, UnavailableCheck

    config = load_config("tiny", overrides=[*marked, "safety.checker='nudenet'"])
    assert isinstance(Studio(config).content_check, NudeNetCheck)
    missing = [*marked, "safety.checker='nudenet'", "safety.required=true", "safety.model='no-such-model'"]
    closed = Studio(load_config("tiny", overrides=missing))
    assert isinstance(closed.content_check, UnavailableCheck)  # fails closed: every picture blocked
    assert closed.content_check(np.zeros((64, 64, 3), np.uint8))


def test_a_marked_output_reproduces_bit_identically(marked: list[str]) -> None:
    studio = Studio(load_config("tiny", overrides=marked))
    result = studio.generate(GenerateRequest("a portrait", count=2, batch_size=2, **FAST))
    again = studio.reproduce(result.outputs[1])  # image 2 of a batch, alone: the same recipe id, same mark
    assert again.identical, again.differences
    assert verify_image(again.result.outputs[0], studio.config).ok
