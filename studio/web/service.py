"""``WebStudio``: what the browser UI and the HTTP API call, one resident ``Studio`` and the campaign store.

Every method is a thin call into the Python API (``Studio``, ``Campaign``, ``IdentityLibrary``, the model
catalogue): the web adds no capability the command line lacks. What it does add is what a shared server
needs: uploads checked before use (size, then ``studio.imageio``), one accelerator slot per GPU (jobs queue
instead of racing), and campaign runs in the background with their progress readable at any time.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.batch.campaign import CAMPAIGNS_DIR, STORE_FILE, Campaign, item_record
from studio.batch.manifest import load_manifest
from studio.batch.plan import Plan
from studio.batch.store import CampaignStore
from studio.config import StudioConfig
from studio.errors import InputError, StudioError
from studio.faces.consent import ConsentTerms
from studio.faces.identity import EnrolReport
from studio.imageio import read_image, read_metadata
from studio.models import open_catalogue
from studio.models.store import check
from studio.pipeline import Studio
from studio.recipe import recipe_from_image
from studio.request import GenerateRequest
from studio.results import GenerateResult, Reproduction
from studio.types import Face, Identity
from studio.web.security import served_folder

logger = logging.getLogger(__name__)

MANIFEST_FOLDER = "manifest"  # <campaign folder>/manifest/: an uploaded manifest and the files it names
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
POSE_SUFFIXES = (".json",)  # OpenPose keypoints (the draft stage parses and checks them)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class UnknownCampaign(InputError):
    """No campaign of that name has a store in the output folder (the API answers 404)."""


@dataclass
class CampaignRun:
    """A campaign run in the background: its state while it runs, and how it ended."""

    name: str
    manifest: Path
    thread: threading.Thread | None = None
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class WebStudio:
    """The server side of ``studio web``: one ``Studio`` for every user, one queue per accelerator."""

    def __init__(
        self,
        config: StudioConfig,
        *,
        profile: str | None = None,
        user_file: Path | None = None,
        overrides: Sequence[str] = (),
        studio: Studio | None = None,
    ) -> None:
        self.config = config
        self.outputs = served_folder(config)  # refuses an output folder that holds a private one
        self.studio = studio or Studio(config)
        self.slots = config.web.slots or _accelerators()
        self._accelerator = threading.BoundedSemaphore(self.slots)
        self._layers = (profile or config.profile, user_file, tuple(overrides))  # how campaigns load
        self._runs: dict[str, CampaignRun] = {}
        self._lock = threading.Lock()

    # -- uploads ------------------------------------------------------------------------------------

    @property
    def max_upload_bytes(self) -> int:
        return self.config.web.max_upload_mb * 1024 * 1024

    def check_upload(self, path: Path, what: str = "image") -> Path:
        """An uploaded file checked before use: its size, then (``what`` "image", or "pose" that is not
        OpenPose JSON) the image format whitelist and pixel cap; ``what`` "manifest": the size only."""
        path = Path(path)
        size = path.stat().st_size if path.is_file() else -1
        if size < 0:
            raise InputError(f"Upload {path.name}: no such file.", fix="upload it again.")
        if size > self.max_upload_bytes:
            raise InputError(
                f"Upload {path.name} is {size / 2**20:.1f} MB, over the {self.config.web.max_upload_mb} MB "
                "limit.",
                fix="upload a smaller file (or raise web.max_upload_mb).",
            )
        if what == "manifest" or (what == "pose" and path.suffix.lower() in POSE_SUFFIXES):
            return path
        read_image(path, max_pixels=self.config.images.max_pixels)  # PNG/JPEG/WEBP, whole, under the cap
        return path

    # -- generate, re-face, reproduce ---------------------------------------------------------------

    @contextmanager
    def accelerator(self) -> Iterator[None]:
        """One job per accelerator slot at a time; the others wait here (in arrival order)."""
        with self._accelerator:
            yield

    def generate(
        self,
        request: GenerateRequest,
        progress: Callable[[int, int], None] | None = None,
        *,
        max_rerolls: int = 0,
    ) -> GenerateResult:
        """``studio generate``: draft → refine → gate → save, on an accelerator slot."""
        for path, what in ((request.pose, "pose"), (request.init_image, "image")):
            if path is not None:
                self.check_upload(path, what)
        with self.accelerator():
            return self.studio.generate(request, progress, max_rerolls=max_rerolls)

    def faces(self, path: Path) -> tuple[Any, tuple[Face, ...]]:
        """An uploaded picture (BGR) and its faces in cast order (the numbers ``0=anna`` refers to)."""
        picture = self.studio.open(self.check_upload(path))
        with self.accelerator():
            return picture.image, self.studio.faces(picture)

    def reface(self, path: Path, cast: str, **options: Any) -> GenerateResult:
        """``studio refine IMAGE --identity CAST`` (``options``: the request's refine options — processors,
        blend, occlusion, regions): the original is never overwritten."""
        self.check_upload(path)
        request = GenerateRequest(prompt="", identity=cast, **options)
        with self.accelerator():
            return self.studio.refine_files([Path(path)], request)

    def reproduce(self, path: Path) -> Reproduction:
        """``studio reproduce``: render an output again from its recipe; says whether pixels are identical."""
        with self.accelerator():
            return self.studio.reproduce(self.output_file(path))

    def parameters(self, path: Path) -> str:
        """An output's A1111 parameters (the text its PNG carries)."""
        meta = read_metadata(self.output_file(path), max_pixels=self.config.images.max_pixels)
        return meta.parameters or "(no parameters recorded)"

    def recipe(self, path: Path) -> dict[str, Any]:
        """An output's recipe (the JSON its PNG carries), with its ``id`` and ``draft_key``."""
        file = self.output_file(path)
        recipe = recipe_from_image(read_metadata(file, max_pixels=self.config.images.max_pixels).recipe, file)
        return {"id": recipe.id, "draft_key": recipe.draft_key, **recipe.to_dict()}

    def output_file(self, path: Path | str) -> Path:
        """``path`` if it is a file inside the output folder; never anything else."""
        resolved = Path(os.path.realpath(Path(path).expanduser()))
        if self.outputs not in resolved.parents or not resolved.is_file():
            raise InputError(f"{Path(path).name} is not an output of this studio.", fix="pick one it wrote.")
        return resolved

    # -- identities ---------------------------------------------------------------------------------

    def enrol(
        self, name: str, photos: Sequence[Path], terms: ConsentTerms, *, replace: bool = False
    ) -> EnrolReport:
        """``studio identity add``: photos checked as uploads; a consent record is required."""
        if not photos:
            raise InputError("No photo was uploaded.", fix="upload one or more photos of the person.")
        for photo in photos:
            self.check_upload(photo)
        with self.accelerator():
            return self.studio.enrol(name, list(photos), consent=terms, replace=replace)

    def identities(self) -> list[Identity]:
        return self.studio.identities.list()

    def identity(self, name: str) -> Identity:
        return self.studio.identities.load(name)

    def revoke(self, name: str) -> Identity:
        return self.studio.identities.revoke(name)

    def remove(self, name: str) -> None:
        self.studio.identities.remove(name)

    # -- models ---------------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """``studio models list``: every catalogued model with present / missing / corrupt and licence."""
        rows = []
        for entry in open_catalogue(self.config).values():
            found = check(entry, self.config.models)
            rows.append(
                {
                    "name": entry.name,
                    "kind": entry.kind,
                    "status": found.status,
                    "commercial": entry.commercial,
                    "licence": entry.licence,
                    "note": found.note,
                }
            )
        return rows

    # -- campaigns ------------------------------------------------------------------------------------

    @property
    def campaigns_folder(self) -> Path:
        return self.outputs / CAMPAIGNS_DIR

    def manifests(self) -> dict[str, Path]:
        """Manifests on offer: uploaded ones (by campaign name) and those in ``web.manifests``."""
        found: dict[str, Path] = {}
        offered = Path(self.config.web.manifests).expanduser()
        for path in sorted(offered.glob("*.toml")) if offered.is_dir() else []:
            found[f"{path.stem} ({offered})"] = path.resolve()
        for path in sorted(self.campaigns_folder.glob(f"*/{MANIFEST_FOLDER}/*.toml")):
            found[path.parent.parent.name] = path
        return found

    def upload_manifest(self, files: Sequence[Path]) -> Path:
        """An uploaded manifest (and the images or pose files it names, beside it) kept in
        ``<campaign>/manifest/``; returns the manifest's path there."""
        tomls = [Path(f) for f in files if Path(f).suffix.lower() == ".toml"]
        if len(tomls) != 1:
            raise InputError(
                f"{len(tomls)} manifests (.toml) among the uploaded files.",
                fix="upload exactly one manifest, with the images it names.",
            )
        others = [Path(f) for f in files if Path(f) not in tomls]
        self.check_upload(tomls[0], "manifest")  # parsed below
        for other in others:
            self.check_upload(other, "pose")  # images and OpenPose JSON files
        staging = self.campaigns_folder / f".upload-{secrets.token_hex(6)}"
        staging.mkdir(parents=True)
        try:
            for source in [*tomls, *others]:
                shutil.copyfile(source, staging / _upload_name(source))
            manifest = load_manifest(staging / _upload_name(tomls[0]))
            name = _checked_name(manifest.name)
            target = self.campaigns_folder / name / MANIFEST_FOLDER
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target / _upload_name(tomls[0])

    def campaign(self, manifest: Path) -> Campaign:
        """The campaign of ``manifest`` under this server's config (its ``[config]`` layered over it)."""
        profile, user_file, overrides = self._layers
        outputs = f"output_dir={str(self.outputs)!r}"
        return Campaign.load(Path(manifest), profile, user_file=user_file, overrides=[*overrides, outputs])

    def plan(self, manifest: Path) -> dict[str, Any]:
        """``studio campaign plan``: what a run would make (nothing is written)."""
        campaign = self.campaign(manifest)
        try:
            return campaign.summary(campaign.plan())
        finally:
            campaign.close()

    def submit(self, manifest: Path) -> dict[str, Any]:
        """Plan, store the items, and start rendering them in the background (``studio campaign run``)."""
        campaign = self.campaign(manifest)
        try:
            plan: Plan = campaign.plan()
            summary = campaign.summary(plan)
            campaign.submit(plan)
        finally:
            campaign.close()
        self.start(manifest)
        return summary

    def start(self, manifest: Path) -> CampaignRun:
        """Render the campaign's unfinished items in the background (one run per campaign)."""
        name = _checked_name(load_manifest(Path(manifest)).name)
        with self._lock:
            run = self._runs.get(name)
            if run is not None and run.running:
                return run
            run = CampaignRun(name, Path(manifest))
            run.thread = threading.Thread(target=self._run, args=(run,), name=f"campaign-{name}", daemon=True)
            self._runs[name] = run
            run.thread.start()
        return run

    def run_of(self, name: str) -> CampaignRun | None:
        return self._runs.get(name)

    def campaign_names(self) -> list[str]:
        """Every campaign with a store in the output folder."""
        return sorted(p.parent.name for p in self.campaigns_folder.glob(f"*/{STORE_FILE}"))

    def store(self, name: str) -> CampaignStore:
        """A campaign's store by name (InputError if there is none); the caller closes it."""
        path = self.campaigns_folder / _checked_name(name) / STORE_FILE
        if not path.is_file():
            raise UnknownCampaign(
                f"No campaign {name!r} in {self.campaigns_folder}.", fix="submit its manifest."
            )
        return CampaignStore(path)

    def status(self, name: str) -> dict[str, Any]:
        """Items per state, and whether a run is going on now (and how the last one ended)."""
        store = self.store(name)
        try:
            counts = store.counts()
        finally:
            store.close()
        run = self._runs.get(name)
        return {
            "campaign": name,
            "counts": counts,
            "running": bool(run and run.running),
            "error": run.error if run else None,
        }

    def items(self, name: str, state: str | None = None) -> list[dict[str, Any]]:
        """Every item (or those in ``state``) with its output file and attempts."""
        store = self.store(name)
        try:
            rows = store.items([state] if state else None)
            return [item_record(store, store.path.parent, row) for row in rows]
        finally:
            store.close()

    def reroll(self, manifest: Path, item: str) -> None:
        """Queue one finished item again with a new seed, and render it."""
        campaign = self.campaign(manifest)
        try:
            campaign.reroll(item)
        finally:
            campaign.close()
        self.start(manifest)

    def favourite(self, manifest: Path, item: str, favourite: bool = True) -> None:
        campaign = self.campaign(manifest)
        try:
            campaign.favourite(item, favourite)
        finally:
            campaign.close()

    def report(self, manifest: Path) -> list[Path]:
        """``studio campaign report``: the offline page first, then the contact sheets."""
        campaign = self.campaign(manifest)
        try:
            files = campaign.report()
        finally:
            campaign.close()
        return [files.html, *files.sheets]

    def _run(self, run: CampaignRun) -> None:
        def update(counts: Any) -> None:
            run.counts = dict(counts)

        try:
            campaign = self.campaign(run.manifest)
            try:
                with self.accelerator():
                    summary = campaign.run(progress=update)
                run.counts = dict(summary.counts)
            finally:
                campaign.close()
        except StudioError as err:
            run.error = str(err)
        except Exception as err:  # a background thread: record it, never lose it
            logger.exception("campaign %s failed", run.name)
            run.error = f"{type(err).__name__}: {err}"


def _accelerators() -> int:
    """GPUs this process sees (one job each at a time); 1 on a CPU-only machine."""
    import torch

    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)


def _checked_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise InputError(
            f"Campaign name {name!r} is not a plain name.",
            fix="use letters, digits, '_', '.' and '-' (campaign.name in the manifest).",
        )
    return name


def _upload_name(path: Path) -> str:
    """The uploaded file's own name (browsers send just the name; a path part is dropped)."""
    name = Path(path).name
    if not name or name.startswith(".") or len(name) > 200:
        raise InputError(f"Upload name {name!r} is not a plain file name.", fix="rename the file.")
    return name
