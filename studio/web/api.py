"""The HTTP API (FastAPI, under ``/api``): submit a campaign manifest, poll it, list and fetch its outputs
with their recipes; list models and identities. Same credentials as the UI (HTTP Basic); its OpenAPI
schema is at ``/api/openapi.json``, interactive docs at ``/api/docs``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel

from studio.batch.store import STATES
from studio.errors import InputError, StudioError
from studio.types import Identity
from studio.web.security import Credentials
from studio.web.service import UnknownCampaign, WebStudio

logger = logging.getLogger(__name__)

ItemState = Annotated[str | None, Query(description=f"Only items in this state: {', '.join(STATES)}.")]


class Problem(BaseModel):
    """Every error: what is wrong and how to fix it."""

    error: str
    fix: str | None = None


class Submitted(BaseModel):
    campaign: str
    items: int
    new_items: int
    drafts: int
    jobs: dict[str, int]
    axes: dict[str, int]
    status_url: str


class CampaignStatus(BaseModel):
    campaign: str
    counts: dict[str, int]
    running: bool
    error: str | None = None


class Item(BaseModel):
    id: str
    job: str
    state: str
    axes: dict[str, str]
    seed: int | None
    favourite: bool
    qa: dict[str, Any] | None
    attempts: list[dict[str, Any]]
    image_url: str | None
    recipe_url: str | None


class IdentityRecord(BaseModel):
    """An identity's consent record; never its embedding or photos."""

    name: str
    consent: str
    scope: list[str]
    expires: str | None
    granted_by: str
    created: str
    revoked: str | None
    photos: int


class ModelRecord(BaseModel):
    name: str
    kind: str
    status: str
    commercial: bool
    licence: str
    note: str


BASIC = HTTPBasic(auto_error=False, realm="Portrait Studio")  # the UI's credentials, for scripts
Basic = Annotated[HTTPBasicCredentials | None, Depends(BASIC)]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "bad input (the message says what and how to fix it)"},
    401: {"model": Problem, "description": "credentials missing or wrong"},
    404: {"model": Problem, "description": "no such campaign or item"},
}


def build_api(service: WebStudio, auth: Credentials | None) -> FastAPI:
    """The API app (mounted at ``/api`` beside the UI)."""

    def authorised(credentials: Basic) -> None:
        if auth is None:
            return
        if credentials is None or not auth.check(credentials.username, credentials.password):
            raise HTTPException(401, "credentials missing or wrong", headers={"WWW-Authenticate": "Basic"})

    api = FastAPI(
        title="Portrait Studio API",
        version="1",
        description=__doc__,
        dependencies=[Depends(authorised)],
        responses=ERRORS,
    )

    @api.exception_handler(StudioError)
    async def studio_error(_: Request, err: StudioError) -> JSONResponse:
        return JSONResponse({"error": err.problem, "fix": err.fix}, status_code=400)

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @api.post("/campaigns", status_code=202, response_model=Submitted)
    def submit_campaign(
        request: Request,
        manifest: Annotated[UploadFile, File(description="The campaign manifest (TOML, docs/campaigns.md).")],
        files: Annotated[list[UploadFile] | None, File(description="Images or pose files it names.")] = None,
    ) -> Submitted:
        """Plan the manifest, store its items and start rendering them (a resubmission adds nothing new
        and renders only what is unfinished)."""
        with tempfile.TemporaryDirectory(prefix="studio-upload-") as folder:
            uploads = [manifest, *(files or [])]
            saved = [_save(upload, Path(folder), service.max_upload_bytes) for upload in uploads]
            path = service.upload_manifest(saved)
        summary = service.submit(path)
        name = summary["campaign"]
        keys = ("campaign", "items", "new_items", "drafts", "jobs", "axes")
        status_url = str(request.url_for("campaign_status", name=name))
        return Submitted(**{k: summary[k] for k in keys}, status_url=status_url)

    @api.get("/campaigns", response_model=list[CampaignStatus])
    def list_campaigns() -> list[CampaignStatus]:
        """Every campaign in the output folder, with its counts per state."""
        return [CampaignStatus(**service.status(name)) for name in service.campaign_names()]

    @api.get("/campaigns/{name}", response_model=CampaignStatus)
    def campaign_status(name: str) -> CampaignStatus:
        """Counts per state, whether a run is going on, and the last run's error (if any)."""
        return CampaignStatus(**_found(lambda: service.status(name)))

    @api.get("/campaigns/{name}/items", response_model=list[Item])
    def campaign_items(request: Request, name: str, state: ItemState = None) -> list[Item]:
        """Items in run order, with their attempts and the URLs of their image and recipe."""
        if state is not None and state not in STATES:
            raise InputError(f"state {state!r} is not one of {', '.join(STATES)}.", fix="pick one of them.")
        rows = _found(lambda: service.items(name, state))
        return [_item(request, name, row) for row in rows]

    @api.get("/campaigns/{name}/items/{item_id}/image", response_class=FileResponse)
    def item_image(name: str, item_id: str) -> FileResponse:
        """The item's output PNG (signed and watermarked, carrying its recipe)."""
        return FileResponse(_output(name, item_id), media_type="image/png")

    @api.get("/campaigns/{name}/items/{item_id}/recipe")
    def item_recipe(name: str, item_id: str) -> dict[str, Any]:
        """The recipe the item's output carries: everything needed to make it again."""
        return service.recipe(_output(name, item_id))

    @api.get("/models", response_model=list[ModelRecord])
    def models() -> list[ModelRecord]:
        """Every catalogued model: present / missing / corrupt, licence, commercial use."""
        return [ModelRecord(**row) for row in service.models()]

    @api.get("/identities", response_model=list[IdentityRecord])
    def identities() -> list[IdentityRecord]:
        """Enrolled identities and their consent records (never an embedding or a photo)."""
        return [_identity(item) for item in service.identities()]

    def _output(name: str, item_id: str) -> Path:
        rows = [row for row in _found(lambda: service.items(name)) if row["id"].startswith(item_id)]
        if len(rows) != 1 or not item_id:
            raise HTTPException(404, f"no single item {item_id!r} in campaign {name!r}")
        if rows[0]["output"] is None:
            raise HTTPException(404, f"item {item_id[:12]} has no output yet (state {rows[0]['state']})")
        return service.output_file(rows[0]["output"])

    return api


def _found(call: Any) -> Any:
    """``call()``, with a campaign that does not exist as a 404."""
    try:
        return call()
    except UnknownCampaign as err:
        raise HTTPException(404, err.problem) from err


def _item(request: Request, name: str, row: dict[str, Any]) -> Item:
    has_output = row["output"] is not None
    urls = {
        key: str(request.url_for(route, name=name, item_id=row["id"])) if has_output else None
        for key, route in (("image_url", "item_image"), ("recipe_url", "item_recipe"))
    }
    fields = ("id", "job", "state", "axes", "seed", "favourite", "qa", "attempts")
    return Item(**{k: row[k] for k in fields}, **urls)


def _identity(item: Identity) -> IdentityRecord:
    return IdentityRecord(
        name=item.name,
        consent=item.consent,
        scope=list(item.scope),
        expires=item.expires,
        granted_by=item.granted_by,
        created=item.created,
        revoked=item.revoked,
        photos=len(item.source_sha256),
    )


def _save(upload: UploadFile, folder: Path, limit: int) -> Path:
    """An upload written to ``folder`` under its own name, refused past ``limit`` bytes."""
    name = Path(upload.filename or "upload").name
    if not name or name.startswith("."):
        raise InputError(f"Upload name {upload.filename!r} is not a plain file name.", fix="rename it.")
    target = folder / name
    written = 0
    with target.open("wb") as handle:
        while chunk := upload.file.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise HTTPException(413, f"{name} is over the {limit // 2**20} MB upload limit")
            handle.write(chunk)
    return target
