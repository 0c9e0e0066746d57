"""The studio's Train page: upload a subject's photos, start its training, watch it, then try it.

Every action is a request to the app's own self-service routes (`serve.selfservice`:
`POST /v1/subjects`, `GET /v1/jobs`, `GET` / `DELETE /v1/jobs/{id}`), made in-process with the
signed-in key (`AppBackend.training_api`): the page has no checks, limits or job submission of
its own, and an error is the API's answer shown as a sentence. While a job runs, a timer asks for
its progress every `POLL_S` seconds; once it is done, "Open in Generate" switches to the Generate
page with the new subject chosen.
"""
from __future__ import annotations

import asyncio
import html
from pathlib import Path

import gradio as gr

from serve.studio_backend import StudioError
from serve.studio_gate import caller_of, key_of

POLL_S = 3.0
METHODS = ("comfusion", "dreambooth")
RECENT_JOBS = 10
ENDED = ("done", "failed", "cancelled")


def _message(text: str, kind: str = "info") -> str:
    return f"**Error:** {text}" if kind == "error" else text


def progress_html(view: dict) -> str:
    """One job: its state, and per method a bar, step / total, the latest loss and speed."""
    rows = []
    for method, m in view.get("methods", {}).items():
        total = max(int(m.get("total") or 0), 1)
        loss = m.get("losses", {}).get("total")
        speed = f"{m['steps_per_s']:.2f}/s" if m.get("steps_per_s") else ""
        rows.append(f'<tr><td style="text-align:left">{html.escape(method)}</td>'
                    f'<td><progress max="{total}" value="{int(m.get("step") or 0)}"></progress></td>'
                    f'<td class="train-steps">{int(m.get("step") or 0)}/{total}</td>'
                    f'<td>{"" if loss is None else f"{loss:.4f}"}</td><td>{speed}</td>'
                    f'<td>{html.escape(str(m.get("state", "")))}</td></tr>')
    head = "".join(f"<th>{c}</th>" for c in ("method", "progress", "step", "loss", "speed", "state"))
    eta = view.get("eta_s")
    left = f" · about {eta:.0f} s left" if isinstance(eta, (int, float)) and view.get("state") == "training" else ""
    error = (f'<p class="train-error" id="train-error"><b>Failed:</b> {html.escape(view["error"])}</p>'
             if view.get("error") else "")
    return (f'<div id="train-view"><p><b>{html.escape(str(view.get("subject")))}</b> · job '
            f'<code>{html.escape(str(view.get("id")))}</code> · <span id="train-state">'
            f'{html.escape(str(view.get("state")))}</span>{left}</p>{error}'
            f'<div style="overflow-x:auto"><table class="studio-table"><tr>{head}</tr>{"".join(rows)}</table>'
            '</div></div>')


def jobs_html(jobs: list[dict]) -> str:
    if not jobs:
        return '<p id="train-jobs-empty">No trainings yet for this key.</p>'
    head = "".join(f"<th>{c}</th>" for c in ("job", "subject", "state", "started"))
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(j.get(k) or ''))}</td>"
                                    for k in ("id", "subject", "state", "created")) + "</tr>"
                   for j in jobs[:RECENT_JOBS])
    return (f'<div style="overflow-x:auto"><table class="studio-table" id="train-jobs-table"><tr>{head}</tr>{rows}'
            '</table></div>')


def upload_fields(class_noun, subject_id, identifier, methods, steps) -> dict:
    """The form's text fields as the API takes them (empty ones left out: the API's defaults apply)."""
    fields = {"class_noun": (class_noun or "").strip(), "id": (subject_id or "").strip(),
              "identifier": (identifier or "").strip(), "methods": ",".join(methods or []),
              "steps": "" if steps is None else str(steps).strip()}
    return {k: v for k, v in fields.items() if v or k == "class_noun"}


def _read_photos(paths: list[str]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("photos", (Path(p).name, Path(p).read_bytes())) for p in paths or []]


class TrainTab:
    """The Train page of one studio (its backend and key store)."""

    def __init__(self, studio):
        self.studio = studio
        self.backend = studio.backend

    def _key(self, request: gr.Request) -> str:
        """The signed-in key; the API counts its rate (so the page does not count it twice)."""
        cookies = dict(request.cookies) if request is not None else {}
        if caller_of(self.studio.keys, cookies) is None:
            raise StudioError("Your key is no longer valid: reload the page and sign in again.")
        return key_of(cookies)

    # --- the page

    def build(self, tabs: gr.Tabs, gen_subject: gr.Dropdown, cmp_subject: gr.Dropdown, notice: gr.Markdown) -> None:
        with gr.Tab("Train", id="train") as tab:
            gr.Markdown("Upload 1 to 5 photos of one subject and name its class; the cluster trains it, and it "
                        "appears in Generate once done.")
            note = gr.Markdown(elem_id="train-note")
            photos = gr.File(label="Photos (1 to 5)", file_count="multiple", file_types=["image"], type="filepath",
                             elem_id="train-photos")
            with gr.Row():
                class_noun = gr.Textbox(label="Class noun", placeholder="dog", elem_id="train-class", min_width=140)
                subject_id = gr.Textbox(label="Subject id (optional)", elem_id="train-id", min_width=140)
                identifier = gr.Textbox(label="Identifier (optional)", elem_id="train-identifier", min_width=140)
            with gr.Row():
                methods = gr.CheckboxGroup(list(METHODS), value=["comfusion"], label="Methods",
                                           elem_id="train-methods", min_width=160)
                steps = gr.Textbox(label="Steps (optional)", placeholder="the app's default", elem_id="train-steps",
                                   min_width=120)
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start", min_width=120)
                refresh = gr.Button("Refresh", elem_id="train-refresh", min_width=100)
                cancel = gr.Button("Cancel job", elem_id="train-cancel", min_width=100)
                use = gr.Button("Open in Generate", visible=False, elem_id="train-use", min_width=120)
            job = gr.Dropdown(label="Job", choices=[], elem_id="train-job", allow_custom_value=True)
            status = gr.Markdown(elem_id="train-status")
            progress = gr.HTML(elem_id="train-progress")
            gr.Markdown("**Recent trainings of this key**")
            jobs = gr.HTML(elem_id="train-jobs")
            timer = gr.Timer(POLL_S, active=False)
        watch = [status, progress, timer, use, jobs]
        tab.select(self.on_open, None, [note, jobs, job], queue=False)
        start.click(self.on_start, [photos, class_noun, subject_id, identifier, methods, steps],
                    [*watch, job], queue=False)
        refresh.click(self.on_refresh, [job], watch, queue=False)
        job.input(self.on_refresh, [job], watch, queue=False)
        timer.tick(self.on_poll, [job], watch, queue=False, show_progress="hidden")
        cancel.click(self.on_cancel, [job], watch, queue=False)
        use.click(self.on_use, [job], [tabs, gen_subject, cmp_subject, status, notice], queue=False)

    # --- handlers

    async def _jobs(self, key: str) -> list[dict]:
        return (await self.backend.training_api("GET", "/v1/jobs", key))["jobs"]

    async def on_open(self, request: gr.Request):
        """The tab is shown: whether training is available here, and the key's recent jobs."""
        try:
            listed = await self._jobs(self._key(request))
        except StudioError as e:
            return _message(str(e), "error"), "", gr.skip()
        ids = [j["id"] for j in listed[:RECENT_JOBS]]
        return "", jobs_html(listed), gr.Dropdown(choices=ids)

    async def on_start(self, photos, class_noun, subject_id, identifier, methods, steps, request: gr.Request):
        try:
            key = self._key(request)
            files = await asyncio.to_thread(_read_photos, photos)
            fields = upload_fields(class_noun, subject_id, identifier, methods, steps)
            answer = await self.backend.training_api("POST", "/v1/subjects", key, files=files or None, data=fields)
            listed = await self._jobs(key)
        except (StudioError, OSError, ValueError, TypeError) as e:
            text = str(e) if isinstance(e, StudioError) else f"could not read the form ({type(e).__name__}: {e})"
            return _message(text, "error"), gr.skip(), gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip()
        job_id = answer["job_id"]
        said = (f"The same photos and settings were sent before: following job `{job_id}`." if answer.get("duplicate")
                else f"Training submitted: job `{job_id}` for subject **{answer.get('subject')}**.")
        view = next((j for j in listed if j["id"] == job_id), None) or {**answer, "id": job_id, "methods": {}}
        ids = [j["id"] for j in listed[:RECENT_JOBS]]
        return (said, progress_html(view), gr.Timer(active=view.get("state") not in ENDED),
                gr.Button(visible=view.get("state") == "done"), jobs_html(listed),
                gr.Dropdown(choices=ids, value=job_id))

    async def _watch(self, job_id: str, request: gr.Request) -> tuple:
        """(status, progress, timer, use button) for one job."""
        if not job_id:
            raise StudioError("Choose a job, or start one.")
        view = await self.backend.training_api("GET", f"/v1/jobs/{job_id}", self._key(request))
        state = view.get("state")
        said = {"done": f"Done: **{view.get('subject')}** is ready. Open it in Generate.",
                "failed": "The training failed; the reason is below.",
                "cancelled": "The training was cancelled."}.get(state, f"Job `{job_id}`: {state}.")
        return (said, progress_html(view), gr.Timer(active=state not in ENDED), gr.Button(visible=state == "done"))

    async def on_poll(self, job_id, request: gr.Request):
        """A timer tick: the job's progress; once it has ended, the list of jobs too."""
        try:
            said, progress, timer, use = await self._watch(job_id, request)
            listed = gr.skip() if timer.active else jobs_html(await self._jobs(self._key(request)))
        except StudioError as e:  # the timer stops; Refresh tries again
            return _message(str(e), "error"), gr.skip(), gr.Timer(active=False), gr.skip(), gr.skip()
        return said, progress, timer, use, listed

    async def on_refresh(self, job_id, request: gr.Request):
        try:
            listed = jobs_html(await self._jobs(self._key(request)))
            if not job_id:
                return "", "", gr.Timer(active=False), gr.Button(visible=False), listed
            return (*await self._watch(job_id, request), listed)
        except StudioError as e:
            return _message(str(e), "error"), gr.skip(), gr.Timer(active=False), gr.skip(), gr.skip()

    async def on_cancel(self, job_id, request: gr.Request):
        try:
            if not job_id:
                raise StudioError("Choose a job to cancel.")
            key = self._key(request)
            await self.backend.training_api("DELETE", f"/v1/jobs/{job_id}", key)
            said, progress, timer, use = await self._watch(job_id, request)
            listed = jobs_html(await self._jobs(key))
        except StudioError as e:
            return _message(str(e), "error"), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return f"Cancelling job `{job_id}`. {said}", progress, gr.Timer(active=True), use, listed

    async def on_use(self, job_id, request: gr.Request):
        """Go to Generate with the job's new subject chosen (the subject lists refreshed)."""
        try:
            key = self._key(request)
            view = await self.backend.training_api("GET", f"/v1/jobs/{job_id}", key) if job_id else {}
            if view.get("state") != "done":
                raise StudioError("The job is not done yet.")
            caller = caller_of(self.studio.keys, dict(request.cookies))
            record = await self.backend.subject(view["subject"], caller)
            listed = sorted({r.id for r in await self.backend.subjects(caller)} | {record.id})
        except StudioError as e:
            return gr.skip(), gr.skip(), gr.skip(), _message(str(e), "error"), gr.skip()
        chosen = gr.Dropdown(choices=listed, value=record.id)
        # the page's notice (e.g. "no subjects registered yet" from when it loaded) is cleared
        return gr.Tabs(selected="generate"), chosen, gr.Dropdown(choices=listed, value=record.id), "", ""
