"""The Gradio UI: Generate, Re-face, Identities, Campaigns and Models tabs over ``WebStudio``.

Handlers only translate between widgets and the Python API; every error a user can fix is shown as its
one-line message (``gr.Error``). Uploaded identity photos and evidence are deleted from Gradio's upload
folder as soon as the enrolment is done.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast, get_args

import cv2
import gradio as gr
import numpy as np
import pandas as pd

from studio.batch.manifest import load_manifest
from studio.batch.store import STATES
from studio.config import FACE_REGIONS, BlendMode, ProcessorName
from studio.errors import InputError, StudioError
from studio.faces.consent import ConsentTerms, scope_list
from studio.imageio import to_pil
from studio.request import GenerateRequest, parse_lora, parse_pairs
from studio.results import GenerateResult
from studio.styles import list_styles
from studio.types import SAMPLERS, FaceAdapterKind
from studio.web.service import IMAGE_SUFFIXES, POSE_SUFFIXES, WebStudio

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
N = TypeVar("N", int, float)
DEFAULT = "style/config"  # what an empty optional field means
# the Generate tab's inputs, in the order its handler receives them
GENERATE_FIELDS = ("prompt", "negative", "variables", "style", "loras", "pose", "width", "height", "steps",
                   "cfg", "sampler", "seed", "count", "identity", "adapter", "scale", "rerolls")  # fmt: skip
ACCELERATOR = "accelerator"  # the Gradio concurrency group of every event that runs a model
ALL = "(all)"
POLL_S = 0.5  # how often a running campaign's counts are read


def shown_errors(fn: F) -> F:
    """A handler whose StudioErrors reach the user as their one-line message (never a traceback); a
    generator handler stays a generator (Gradio streams its updates)."""

    def shown(err: Exception) -> gr.Error:
        if isinstance(err, gr.Error):
            return err
        if isinstance(err, StudioError):
            return gr.Error(str(err), print_exception=False)
        logger.exception("web handler %s failed", fn.__name__)
        return gr.Error(f"Internal error ({type(err).__name__}); the server log has the details.")

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise shown(err) from err

        return cast(F, stream)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise shown(err) from err

    return cast(F, call)


def build_ui(service: WebStudio) -> gr.Blocks:
    """Every tab, wired to ``service``."""
    slots = service.slots
    gpu: dict[str, Any] = {"concurrency_limit": slots, "concurrency_id": ACCELERATOR}
    with gr.Blocks(title="Portrait Studio", analytics_enabled=False, delete_cache=(3600, 3600)) as ui:
        gr.Markdown("# Portrait Studio")
        if service.config.profile == "tiny":
            gr.Markdown("**tiny profile**: random-weight models, the pictures are NOT portraits.")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate"):
                generate = _generate_tab(service)
            with gr.Tab("Re-face", id="reface"):
                reface = _reface_tab(service)
            with gr.Tab("Identities", id="identities"):
                identities = _identities_tab(service)
            with gr.Tab("Campaigns", id="campaigns"):
                campaigns = _campaigns_tab(service)
            with gr.Tab("Models", id="models"):
                models = _models_tab(service)

        # -- Generate -------------------------------------------------------------------------------
        @shown_errors
        def run_generate(*values: Any, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
            request, max_rerolls = _request(values)

            def steps(done: int, total: int) -> None:
                progress((done, total), desc="drafting", unit="steps")

            result = service.generate(request, steps, max_rerolls=max_rerolls)
            paths = [str(p) for p in (*result.outputs, *result.failed_qa)]
            gallery = [(p, _caption(Path(p))) for p in paths]
            return gallery, paths, _result_text(result), None, ""

        generate["run"].click(
            run_generate,
            generate["inputs"],
            [
                generate["gallery"],
                generate["paths"],
                generate["status"],
                generate["selected"],
                generate["params"],
            ],
            **gpu,
        )

        @shown_errors
        def pick(paths: list[str], event: gr.SelectData) -> tuple[str, str]:
            path = paths[event.index]
            return path, service.parameters(Path(path))

        generate["gallery"].select(pick, [generate["paths"]], [generate["selected"], generate["params"]])

        @shown_errors
        def to_reface(path: str | None) -> tuple[Any, ...]:
            if not path:
                raise InputError("No image is selected.", fix="click an image in the gallery first.")
            image, faces = service.faces(Path(path))
            return (gr.Tabs(selected="reface"), path, *_faces_view(service, image, faces))

        generate["to_reface"].click(
            to_reface,
            [generate["selected"]],
            [tabs, reface["master"], reface["original"], reface["faces"], reface["cast"]],
            **gpu,
        )

        @shown_errors
        def reproduce(path: str | None, paths: list[str]) -> tuple[Any, ...]:
            if not path:
                raise InputError("No image is selected.", fix="click an image in the gallery first.")
            again = service.reproduce(Path(path))
            new = [str(p) for p in again.result.outputs]
            paths = [*paths, *new]
            same = (
                "identical pixels" if again.identical else "DIFFERENT pixels: " + "; ".join(again.differences)
            )
            text = f"reproduced {Path(path).name} → {', '.join(Path(p).name for p in new)}: {same}"
            return [(p, _caption(Path(p))) for p in paths], paths, text

        generate["reproduce"].click(
            reproduce,
            [generate["selected"], generate["paths"]],
            [generate["gallery"], generate["paths"], generate["status"]],
            **gpu,
        )

        # -- Re-face --------------------------------------------------------------------------------
        @shown_errors
        def find_faces(path: str | None) -> tuple[Any, ...]:
            if not path:
                return None, None, ""
            image, faces = service.faces(Path(path))
            return _faces_view(service, image, faces)

        reface["master"].upload(
            find_faces, [reface["master"]], [reface["original"], reface["faces"], reface["cast"]], **gpu
        )

        @shown_errors
        def run_reface(
            path: str | None,
            cast_text: str,
            processors: list[str],
            blend: str,
            occlusion: bool,
            regions: list[str],
        ) -> tuple[Any, str]:
            if not path:
                raise InputError("No master creative is uploaded.", fix="upload one first.")
            if not processors:
                raise InputError("No face processor is ticked.", fix="tick swap (and enhance, if wanted).")
            options = {"processors": tuple(processors), "blend": blend, "occlusion": occlusion}
            result = service.reface(Path(path), cast_text.strip(), regions=tuple(regions), **options)
            written = [*result.outputs, *result.failed_qa]
            return (str(written[0]) if written else None), _result_text(result)

        options = [reface[k] for k in ("processors", "blend", "occlusion", "regions")]
        reface["run"].click(
            run_reface,
            [reface["master"], reface["cast"], *options],
            [reface["result"], reface["status"]],
            **gpu,
        )

        # -- Identities -----------------------------------------------------------------------------
        @shown_errors
        def enrol(
            name: str,
            photos: list[str] | None,
            record: str,
            scope: str,
            expires: str,
            granted_by: str,
            evidence: str | None,
            replace: bool,
        ) -> tuple[Any, ...]:
            uploads = [Path(p) for p in photos or []]
            terms = ConsentTerms(
                record,
                scope_list(scope or "internal"),
                expires.strip() or None,
                Path(evidence) if evidence else None,
                granted_by.strip(),
            )
            report = service.enrol(name.strip(), uploads, terms, replace=replace)
            # enrolled: the person's photos and release leave the upload folder now (after a refusal they
            # stay for a corrected try, until Gradio's cache clean-up an hour later)
            for path in [*uploads, *([Path(evidence)] if evidence else [])]:
                path.unlink(missing_ok=True)
            lines = [f"enrolled **{report.identity.name}** from {len(report.used)} photo(s)"]
            lines += [f"- rejected {path.name}: {reason}" for path, reason in report.rejected]
            lines += [f"- warning: {warning}" for warning in report.warnings]
            return "\n".join(lines), _identity_rows(service), *_identity_choices(service)

        identities["enrol"].click(
            enrol,
            identities["inputs"],
            [identities["status"], identities["table"], identities["pick"], generate["identity"]],
            **gpu,
        )

        @shown_errors
        def show(name: str | None) -> str:
            item = service.identity(_chosen(name))
            keys = (
                "name",
                "consent",
                "scope",
                "expires",
                "evidence_sha256",
                "granted_by",
                "created",
                "revoked",
            )
            return "\n".join(f"- **{k}**: {getattr(item, k) or '-'}" for k in keys)

        @shown_errors
        def revoke(name: str | None) -> tuple[Any, ...]:
            item = service.revoke(_chosen(name))
            return (
                f"revoked **{item.name}** at {item.revoked}",
                _identity_rows(service),
                *_identity_choices(service),
            )

        @shown_errors
        def remove(name: str | None) -> tuple[Any, ...]:
            service.remove(_chosen(name))
            return f"removed **{name}**", _identity_rows(service), *_identity_choices(service)

        changed = [identities["status"], identities["table"], identities["pick"], generate["identity"]]
        identities["show"].click(show, [identities["pick"]], [identities["status"]])
        identities["revoke"].click(revoke, [identities["pick"]], changed)
        identities["remove"].click(remove, [identities["pick"]], changed)

        # -- Campaigns ------------------------------------------------------------------------------
        @shown_errors
        def upload(files: list[str] | None) -> tuple[Any, str]:
            path = service.upload_manifest([Path(f) for f in files or []])
            choices = service.manifests()
            name = next(label for label, p in choices.items() if p == path)
            return gr.Dropdown(
                choices=list(choices), value=name
            ), f"uploaded {path.name} as campaign **{name}**"

        campaigns["upload"].upload(upload, [campaigns["upload"]], [campaigns["pick"], campaigns["plan"]])

        @shown_errors
        def plan(label: str | None) -> str:
            summary = service.plan(_manifest(service, label))
            return _plan_text(summary)

        campaigns["plan_button"].click(plan, [campaigns["pick"]], [campaigns["plan"]])

        @shown_errors
        def watch(label: str | None, state: str, axis: str) -> Iterator[tuple[Any, ...]]:
            summary = service.submit(_manifest(service, label))
            yield _plan_text(summary), "starting…", *_browse(service, summary["campaign"], state, axis)
            for row in _follow(service, summary["campaign"], state, axis):
                yield gr.skip(), *row

        browse_out = [campaigns["gallery"], campaigns["items"], campaigns["axis"]]
        campaigns["run"].click(
            watch,
            [campaigns["pick"], campaigns["state"], campaigns["axis"]],
            [campaigns["plan"], campaigns["counts"], *browse_out],
        )

        @shown_errors
        def browse(label: str | None, state: str, axis: str) -> tuple[Any, ...]:
            name = _campaign_name(service, label)
            return _counts_text(service.status(name)), *_browse(service, name, state, axis)

        for trigger in (campaigns["refresh"].click, campaigns["state"].change, campaigns["axis"].change):
            trigger(
                browse,
                [campaigns["pick"], campaigns["state"], campaigns["axis"]],
                [campaigns["counts"], *browse_out],
            )

        @shown_errors
        def pick_item(items: list[dict[str, Any]], event: gr.SelectData) -> tuple[str, str]:
            item = items[event.index]
            return item["id"], _item_text(item)

        campaigns["gallery"].select(pick_item, [campaigns["items"]], [campaigns["item"], campaigns["detail"]])

        @shown_errors
        def reroll(label: str | None, item: str | None, state: str, axis: str) -> Iterator[tuple[Any, ...]]:
            manifest = _manifest(service, label)
            service.reroll(manifest, _chosen(item, "item"))
            yield from _follow(service, _campaign_name(service, label), state, axis)

        campaigns["reroll"].click(
            reroll,
            [campaigns["pick"], campaigns["item"], campaigns["state"], campaigns["axis"]],
            [campaigns["counts"], *browse_out],
        )

        @shown_errors
        def favourite(label: str | None, item: str | None, items: list[dict[str, Any]]) -> str:
            chosen = _chosen(item, "item")
            now = not next((i["favourite"] for i in items if i["id"] == chosen), False)
            service.favourite(_manifest(service, label), chosen, now)
            return f"item {chosen[:12]} {'marked' if now else 'no longer'} a favourite"

        campaigns["favourite"].click(
            favourite, [campaigns["pick"], campaigns["item"], campaigns["items"]], [campaigns["detail"]]
        )

        @shown_errors
        def report(label: str | None) -> list[str]:
            return [str(p) for p in service.report(_manifest(service, label))]

        campaigns["report_button"].click(report, [campaigns["pick"]], [campaigns["report"]])

        # -- Models ---------------------------------------------------------------------------------
        models["refresh"].click(shown_errors(lambda: _model_rows(service)), [], [models["table"]])
    return ui


# -- tabs (layout only) ------------------------------------------------------------------------------


def _generate_tab(service: WebStudio) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt ({variables} allowed)", lines=2, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative (empty: style/config)", elem_id="gen-negative")
            variables = gr.Textbox(label="Variables (age=30, city=Oslo)", elem_id="gen-vars")
            with gr.Row():
                style = gr.Dropdown([""] + [s.name for s in list_styles()], value="", label="Style preset")
                loras = gr.Textbox(label="LoRAs (name:weight, ...)", elem_id="gen-loras")
            pose = gr.File(
                label="Pose (image or OpenPose JSON)",
                file_types=[*IMAGE_SUFFIXES, *POSE_SUFFIXES],
                type="filepath",
                elem_id="gen-pose",
            )
        with gr.Column(scale=1):
            with gr.Row():
                width = gr.Textbox(label="Width px", placeholder=DEFAULT, elem_id="gen-width")
                height = gr.Textbox(label="Height px", placeholder=DEFAULT, elem_id="gen-height")
            with gr.Row():
                steps = gr.Textbox(label="Steps", placeholder=DEFAULT, elem_id="gen-steps")
                cfg = gr.Textbox(label="CFG", placeholder=DEFAULT, elem_id="gen-cfg")
            sampler = gr.Dropdown(["", *SAMPLERS], value="", label="Sampler")
            with gr.Row():
                seed = gr.Number(label="Seed", value=42, precision=0, elem_id="gen-seed")
                count = gr.Number(
                    label="Count", value=1, precision=0, minimum=1, maximum=64, elem_id="gen-count"
                )
            identity = gr.Dropdown(
                _identity_names(service),
                value=None,
                allow_custom_value=True,
                label="Identity (or 0=anna,1=kenji)",
                elem_id="gen-identity",
            )
            with gr.Row():
                adapter = gr.Dropdown(["", *get_args(FaceAdapterKind)], value="", label="Face adapter")
                scale = gr.Textbox(label="Adapter scale", placeholder="config", elem_id="gen-adapter-scale")
            rerolls = gr.Number(
                label="Re-roll QA failures (times)", value=0, precision=0, minimum=0, maximum=100
            )
    widgets = locals()  # the widgets above, by their names in GENERATE_FIELDS
    c["inputs"] = [widgets[name] for name in GENERATE_FIELDS]
    c["identity"] = identity
    c["run"] = gr.Button("Generate", variant="primary", elem_id="gen-run")
    c["status"] = gr.Markdown(elem_id="gen-status")
    c["gallery"] = gr.Gallery(label="Outputs", columns=4, elem_id="gen-gallery", interactive=False)
    c["paths"] = gr.State([])
    c["selected"] = gr.State(None)
    c["params"] = gr.Textbox(label="Parameters (A1111)", lines=4, interactive=False, elem_id="gen-params")
    with gr.Row():
        c["to_reface"] = gr.Button("Send to re-face", elem_id="gen-to-reface")
        c["reproduce"] = gr.Button("Reproduce", elem_id="gen-reproduce")
    return c


def _reface_tab(service: WebStudio) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["master"] = gr.File(
        label="Master creative (PNG, JPEG, WEBP)",
        file_types=list(IMAGE_SUFFIXES),
        type="filepath",
        elem_id="rf-master",
    )
    with gr.Row():
        c["original"] = gr.Image(label="Faces found (numbered)", interactive=False, elem_id="rf-original")
        c["result"] = gr.Image(label="Re-faced", interactive=False, type="filepath", elem_id="rf-result")
    c["faces"] = gr.Markdown(elem_id="rf-faces")
    c["cast"] = gr.Textbox(
        label="Cast: face number = identity (0=anna,1=kenji), or one name for every face", elem_id="rf-cast"
    )
    config = service.config.refine
    with gr.Row():
        processors = list(get_args(ProcessorName))
        c["processors"] = gr.CheckboxGroup(processors, value=list(config.processors), label="Processors")
        c["blend"] = gr.Radio(list(get_args(BlendMode)), value=config.blend, label="Blend")
        c["occlusion"] = gr.Checkbox(
            value=config.mask.occlusion, label="Occlusion mask (keep hands, glasses)", elem_id="rf-occlusion"
        )
    c["regions"] = gr.CheckboxGroup(
        list(FACE_REGIONS), value=list(config.mask.regions), label="Face regions (none: the whole oval)"
    )
    c["run"] = gr.Button("Re-face", variant="primary", elem_id="rf-run")
    c["status"] = gr.Markdown(elem_id="rf-status")
    return c


def _identities_tab(service: WebStudio) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column():
            name = gr.Textbox(label="Name (letters, digits, _ . -)", elem_id="id-name")
            photos = gr.File(
                label="Photos of the person",
                file_count="multiple",
                file_types=list(IMAGE_SUFFIXES),
                type="filepath",
                elem_id="id-photos",
            )
        with gr.Column():
            record = gr.Textbox(label="Consent record (required)", elem_id="id-consent")
            scope = gr.Textbox(
                label="Scope (purposes, comma-separated)", value="internal", elem_id="id-scope"
            )
            expires = gr.Textbox(label="Expires (YYYY-MM-DD, empty: never)", elem_id="id-expires")
            granted_by = gr.Textbox(label="Granted by", elem_id="id-granted-by")
            evidence = gr.File(
                label="Signed release (only its sha256 is kept)", type="filepath", elem_id="id-evidence"
            )
            replace = gr.Checkbox(label="Replace an existing identity of this name")
    c["inputs"] = [name, photos, record, scope, expires, granted_by, evidence, replace]
    c["enrol"] = gr.Button("Enrol", variant="primary", elem_id="id-enrol")
    c["status"] = gr.Markdown(elem_id="id-status")
    c["table"] = gr.Dataframe(_identity_rows(service), interactive=False, elem_id="id-table")
    with gr.Row():
        c["pick"] = gr.Dropdown(_identity_names(service), value=None, label="Identity", elem_id="id-pick")
        c["show"] = gr.Button("Show", elem_id="id-show")
        c["revoke"] = gr.Button("Revoke consent", elem_id="id-revoke")
        c["remove"] = gr.Button("Remove", variant="stop", elem_id="id-remove")
    return c


def _campaigns_tab(service: WebStudio) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        c["pick"] = gr.Dropdown(
            list(service.manifests()), value=None, label="Campaign manifest", elem_id="cp-pick"
        )
        c["upload"] = gr.File(
            label="Upload a manifest (.toml) with the images it names",
            file_count="multiple",
            file_types=[".toml", *IMAGE_SUFFIXES, *POSE_SUFFIXES],
            type="filepath",
            elem_id="cp-upload",
        )
    with gr.Row():
        c["plan_button"] = gr.Button("Plan", elem_id="cp-plan-button")
        c["run"] = gr.Button("Run", variant="primary", elem_id="cp-run")
        c["refresh"] = gr.Button("Refresh", elem_id="cp-refresh")
    c["plan"] = gr.Markdown(elem_id="cp-plan")
    c["counts"] = gr.Markdown(elem_id="cp-counts")
    with gr.Row():
        c["state"] = gr.Dropdown([ALL, *STATES], value=ALL, label="State", elem_id="cp-state")
        c["axis"] = gr.Dropdown([ALL], value=ALL, label="Axis value", elem_id="cp-axis")
    c["gallery"] = gr.Gallery(label="Outputs", columns=6, interactive=False, elem_id="cp-gallery")
    c["items"] = gr.State([])
    c["item"] = gr.State(None)
    c["detail"] = gr.Markdown(elem_id="cp-detail")
    with gr.Row():
        c["reroll"] = gr.Button("Re-roll this item", elem_id="cp-reroll")
        c["favourite"] = gr.Button("Favourite ☆/★", elem_id="cp-favourite")
        c["report_button"] = gr.Button("Report", elem_id="cp-report-button")
    c["report"] = gr.File(
        label="Report (offline page and contact sheets)", interactive=False, elem_id="cp-report"
    )
    return c


def _models_tab(service: WebStudio) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["table"] = gr.Dataframe(_model_rows(service), interactive=False, wrap=True, elem_id="models-table")
    c["refresh"] = gr.Button("Refresh", elem_id="models-refresh")
    return c


# -- helpers ---------------------------------------------------------------------------------------


def _request(values: tuple[Any, ...]) -> tuple[GenerateRequest, int]:
    """The widgets' values as a GenerateRequest (the same checks as the command line's options)."""
    v = dict(zip(GENERATE_FIELDS, values, strict=True))
    if not (v["prompt"] or "").strip():
        raise InputError("The prompt is empty.", fix="describe the portrait.")
    request = GenerateRequest(
        prompt=v["prompt"],
        negative=v["negative"] or None,
        style=v["style"] or None,
        variables=parse_pairs([x for x in (v["variables"] or "").split(",") if x.strip()], "variable"),
        seed=int(v["seed"] if v["seed"] is not None else 42),
        count=int(v["count"] or 1),
        width=_number(v["width"], "width", int),
        height=_number(v["height"], "height", int),
        steps=_number(v["steps"], "steps", int),
        cfg=_number(v["cfg"], "CFG", float),
        sampler=v["sampler"] or None,
        loras=tuple(parse_lora(item, "LoRA") for item in (v["loras"] or "").split(",") if item.strip()),
        pose=Path(v["pose"]) if v["pose"] else None,
        identity=(v["identity"] or "").strip() or None,
        adapter=v["adapter"] or None,
        adapter_scale=_number(v["scale"], "adapter scale", float),
    )
    return request, int(v["rerolls"] or 0)


def _number(text: str | None, name: str, kind: type[N]) -> N | None:
    """An optional number field: empty means "from the style preset or the config"."""
    if not (text or "").strip():
        return None
    try:
        return kind(text.strip())
    except ValueError as err:
        raise InputError(
            f"{name} {text.strip()!r} is not a number.", fix=f"enter a number or leave {name} empty."
        ) from err


def _caption(path: Path) -> str:
    return ("FAILED QA · " if "FAILED-QA" in path.name else "") + path.name


def _result_text(result: GenerateResult) -> str:
    lines = [f"- note: {note}" for note in result.notes]
    lines += [f"- refine: {status}" for status in result.statuses]
    lines += [f"- refine changed nothing: {item}" for item in result.unchanged]
    lines += [f"- **blocked by the content check, not written**: {item}" for item in result.blocked]
    lines += [f"- **failed QA**, written apart: {path.name}" for path in result.failed_qa]
    lines += [f"- wrote {path.name}" for path in result.outputs]
    lines.append("- stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    return "\n".join(lines)


def _faces_view(service: WebStudio, image: np.ndarray, faces: tuple[Any, ...]) -> tuple[Any, str, str]:
    """The picture with each face boxed and numbered, a line per face, and a cast to start from."""
    drawn = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 300))
    for number, face in enumerate(faces):
        x1, y1, x2, y2 = (round(v) for v in face.box)
        cv2.rectangle(drawn, (x1, y1), (x2, y2), (0, 220, 255), thickness)
        scale = max(0.3, (x2 - x1) / 60)
        cv2.putText(
            drawn,
            str(number),
            (x1 + thickness, max(y1 - 2 * thickness, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 220, 255),
            thickness,
            cv2.LINE_AA,
        )
    lines = [
        f"- face **{n}**: {round(f.box[2] - f.box[0])} px wide, score {f.score:.2f}"
        for n, f in enumerate(faces)
    ]
    text = f"{len(faces)} face(s) found\n" + "\n".join(lines)
    names = _identity_names(service)
    cast_text = ",".join(f"{n}={names[0]}" for n in range(len(faces))) if names else ""
    return to_pil(drawn), text, cast_text


def _identity_names(service: WebStudio) -> list[str]:
    return [item.name for item in service.identities() if not item.revoked]


def _identity_rows(service: WebStudio) -> pd.DataFrame:
    header = ["name", "photos", "consent", "scope", "expires", "created", "status"]
    rows = [
        [
            i.name,
            str(len(i.source_sha256)),
            i.consent,
            ", ".join(i.scope) or "any",
            i.expires or "-",
            i.created,
            f"revoked {i.revoked}" if i.revoked else "active",
        ]
        for i in service.identities()
    ]
    return pd.DataFrame(rows, columns=header)


def _identity_choices(service: WebStudio) -> tuple[Any, Any]:
    names = _identity_names(service)
    return gr.Dropdown(choices=names, value=None), gr.Dropdown(choices=names)


def _chosen(value: str | None, what: str = "identity") -> str:
    if not value:
        raise InputError(f"No {what} is chosen.", fix=f"pick an {what} first.")
    return value


def _model_rows(service: WebStudio) -> pd.DataFrame:
    header = ["name", "kind", "status", "commercial", "licence", "where / note"]
    rows = [
        [m["name"], m["kind"], m["status"], "yes" if m["commercial"] else "no", m["licence"], m["note"]]
        for m in service.models()
    ]
    return pd.DataFrame(rows, columns=header)


def _manifest(service: WebStudio, label: str | None) -> Path:
    found = service.manifests().get(_chosen(label, "campaign manifest"))
    if found is None:
        raise InputError(f"No manifest {label!r} is on offer.", fix="upload it, or pick one from the list.")
    return found


def _campaign_name(service: WebStudio, label: str | None) -> str:
    return load_manifest(_manifest(service, label)).name


def _plan_text(summary: dict[str, Any]) -> str:
    lines = [
        f"campaign **{summary['campaign']}**: {summary['items']} items ({summary['new_items']} not yet in "
        f"the store), {summary['drafts']} drafts to render"
    ]
    lines += [f"- job {job}: {n} items" for job, n in summary["jobs"].items()]
    lines += [f"- axis {axis}: {n} values" for axis, n in summary["axes"].items()]
    return "\n".join(lines)


def _counts_text(status: dict[str, Any]) -> str:
    counts = " · ".join(f"{state} **{n}**" for state, n in status["counts"].items())
    running = "running" if status["running"] else "idle"
    error = f"\n\n**error:** {status['error']}" if status.get("error") else ""
    return f"{running}: {counts}{error}"


def _browse(service: WebStudio, name: str, state: str, axis: str) -> tuple[Any, list[dict[str, Any]], Any]:
    """The campaign's outputs in ``state`` with axis value ``axis`` (name=value), and the axis choices."""
    items = service.items(name, None if state in (ALL, None) else state)
    values = sorted({f"{k}={v}" for item in items for k, v in item["axes"].items()})
    if axis not in (ALL, None):
        key, _, value = axis.partition("=")
        items = [item for item in items if item["axes"].get(key) == value]
    shown = [item for item in items if item["output"]]
    gallery = [(item["output"], _item_caption(item)) for item in shown]
    choices = gr.Dropdown(choices=[ALL, *values], value=axis if axis in values else ALL)
    return gallery, shown, choices


def _follow(service: WebStudio, name: str, state: str, axis: str) -> Iterator[tuple[Any, ...]]:
    """Yield the counts and outputs until the campaign's background run ends."""
    while True:
        run = service.run_of(name)
        yield _counts_text(service.status(name)), *_browse(service, name, state, axis)
        if run is None or not run.running:
            return
        time.sleep(POLL_S)


def _item_caption(item: dict[str, Any]) -> str:
    star = "★ " if item["favourite"] else ""
    axes = " · ".join(f"{v}" for v in item["axes"].values())
    return f"{star}{item['state']} · {axes}"


def _item_text(item: dict[str, Any]) -> str:
    lines = [
        f"item `{item['id'][:12]}` · {item['state']} · seed {item['seed']}"
        + (" · ★ favourite" if item["favourite"] else "")
    ]
    lines += [f"- {k}: {v}" for k, v in item["axes"].items()]
    for attempt in item["attempts"]:
        reasons = "; ".join((attempt.get("qa") or {}).get("reasons", [])) or attempt.get("message") or ""
        lines.append(f"- attempt {attempt['n']} seed {attempt['seed']}: {attempt['state']} {reasons}")
    return "\n".join(lines)
