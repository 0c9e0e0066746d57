"""The studio: a Gradio page at `/studio` to try subjects in scenes, compare methods and run the
paper's user study (Table 2).

- **Generate**: a subject from the registry, one of the paper's 15 scenes or a free prompt, seed,
  steps, number of images; "Surprise me" renders the subject in four random scenes at once.
- **Compare**: every registered version of one subject (its aliases: `comfusion`, `dreambooth`, a
  LoRA version, ...) on the same seed across the 15 scenes, one grid, the training photo beside it.
- **Vote**: blind pairs (random subject, scene and method pair, random order) and the paper's two
  questions; votes go to a SQL database (`serve.votes`).
- **Results**: win rates per method pair and subject with Wilson 95% intervals, counts, a chart,
  CSV export, and logging to MLflow's `evaluation` run.
- **Train** (`serve.studio_train`): upload photos, start a training through the app's own
  self-service routes, watch it, then open the new subject in Generate.

How it lives in the app: `serve.app` mounts `serve.studio_gate.StudioMount` at `/studio` when it is
imported; `Ingress.__init__` calls `start_studio(self)`, which builds the Gradio app on the
replica's registry, Generator handle and key store and installs it behind the gate. Every event
runs unqueued (`queue=False`: one HTTP request, its inputs in the request) and pictures travel
inline as data URIs, so nothing depends on a Gradio session or file cache held by one replica,
and any Ingress replica can answer any request. The one exception is the Train page's photos:
Gradio uploads them to the replica's file cache before "Start training" sends them on, so with
several Ingress replicas both requests must reach the same one (a single replica, or sticky
routing).
"""
from __future__ import annotations

import asyncio
import base64
import html
import io
import logging
import os
import random
import secrets

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the cluster
import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from starlette.responses import PlainTextResponse, Response  # noqa: E402

from comfusion.prompts import PAPER_SCENES  # noqa: E402
from serve import votes as V  # noqa: E402
from serve.studio_backend import AppBackend, StudioError, no_subjects_message  # noqa: E402
from serve.studio_gate import caller_of, install  # noqa: E402
from serve.studio_train import TrainTab  # noqa: E402

log = logging.getLogger("ray.serve")
FREE_PROMPT = "(free prompt)"
SURPRISE_SCENES = 4
COMPARE_CONCURRENCY = 4  # Generator calls in flight at once (its queue holds 8 per caller)
MAX_SEED = 2**32 - 1
CSS = """
.studio-img { image-rendering: pixelated; width: 100%; max-width: 256px; height: auto; border-radius: 4px; }
.studio-cards { display: flex; flex-wrap: wrap; gap: 12px; }
.studio-card { flex: 1 1 140px; max-width: 256px; font-size: .85em; }
.studio-grid { overflow-x: auto; }
.studio-grid table { border-collapse: collapse; }
.studio-grid td, .studio-grid th { padding: 2px; text-align: center; font-size: .75em; vertical-align: top; }
.studio-grid .studio-img { width: 72px; }
.studio-pair { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; max-width: 560px; }
.studio-pair figure { margin: 0; text-align: center; }
.studio-table { border-collapse: collapse; font-size: .85em; }
.studio-table td, .studio-table th { border-bottom: 1px solid #ddd; padding: 3px 6px; text-align: right; }
#train-view progress { width: 8em; max-width: 30vw; }
"""


# ---------------------------------------------------------------------------------------
# HTML pieces (pictures inline: no file cache, any replica answers)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, cls: str = "studio-img", elem_id: str = "") -> str:
    ident = f' id="{elem_id}"' if elem_id else ""
    return f'<img class="{cls}"{ident} src="{data_uri(png)}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'


def cards(items: list[tuple[bytes, str, int]]) -> str:
    """Pictures with their prompt and seed underneath."""
    parts = [f'<figure class="studio-card">{img(png, prompt)}<figcaption>{html.escape(prompt)}<br>seed {seed}'
             f'</figcaption></figure>' for png, prompt, seed in items]
    return f'<div class="studio-cards" id="generated">{"".join(parts)}</div>'


def message(text: str, kind: str = "info") -> str:
    return f"**Error:** {text}" if kind == "error" else text


# ---------------------------------------------------------------------------------------
# the studio


class Studio:
    """The Gradio app of one Ingress replica, with the vote store and the key store it uses."""

    def __init__(self, backend: AppBackend, keys, store: V.VoteStore, default_steps: int):
        self.backend, self.keys, self.store = backend, keys, store
        self.default_steps = default_steps
        self.train = TrainTab(self)
        self.blocks = self._build()
        self._parent = FastAPI()
        gr.mount_gradio_app(self._parent, self.blocks, path="/studio", ssr_mode=False, footer_links=[],
                            run_history=False, theme=gr.themes.Default(font=["system-ui", "sans-serif"],
                                                                       font_mono=["monospace"]),
                            css=CSS, show_error=True)
        self._gradio = self._parent.routes[-1].app  # the Gradio app mount_gradio_app made
        self._started = False
        self._start_lock = asyncio.Lock()

    async def asgi(self, scope, receive, send) -> None:
        """Forward a signed-in request to Gradio (its startup events run on the first one)."""
        if not self._started:
            async with self._start_lock:
                if not self._started:
                    self.blocks.run_startup_events()
                    await self.blocks.run_extra_startup_events()
                    self._started = True
        await self._gradio(scope, receive, send)

    async def export(self, name: str) -> Response:
        """`/studio/export/votes.csv` (every vote and what was shown) and `/studio/export/results.csv`."""
        if name not in ("votes.csv", "results.csv"):
            return PlainTextResponse(f"no export {name!r}; there are votes.csv and results.csv", status_code=404)
        rows = await asyncio.to_thread(self.store.rows)
        text = V.votes_csv(rows) if name == "votes.csv" else V.results_csv(V.results(rows))
        return Response(text, media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="studio-{name}"'})

    # --- who is asking

    def _caller(self, request: gr.Request):
        """The signed-in key (checked again on every event: a revoked key stops here), rate-limited."""
        caller = caller_of(self.keys, dict(request.cookies)) if request is not None else None
        if caller is None:
            raise StudioError("Your key is no longer valid: reload the page and sign in again.")
        wait = self.keys.admit(caller)
        if wait > 0:
            raise StudioError(f"Key {caller.key_id!r} is over its request rate; try again in {wait:.0f} s.")
        return caller

    # --- the page

    def _build(self) -> gr.Blocks:
        with gr.Blocks(title="ComFusion studio", analytics_enabled=False) as blocks:
            with gr.Row():
                gr.Markdown("## ComFusion studio")
                who = gr.HTML(elem_id="who")
            notice = gr.Markdown(elem_id="notice")
            with gr.Tabs() as tabs:
                gen_subject = self._generate_tab()
                cmp_subject = self._compare_tab()
                self._vote_tab()
                self._results_tab()
                self.train.build(tabs, gen_subject, cmp_subject, notice)
            blocks.load(self.on_load, outputs=[who, notice, gen_subject, cmp_subject], queue=False)
        return blocks

    async def on_load(self, request: gr.Request):
        try:
            caller = self._caller(request)
            subjects = [r.id for r in await self.backend.subjects(caller)]
        except StudioError as e:
            empty = gr.Dropdown(choices=[], value=None)
            return "", message(str(e), "error"), empty, empty
        who = (f'<div style="text-align:right">signed in as <b>{html.escape(caller.key_id)}</b> · '
               f'<a href="logout">sign out</a></div>')
        note = "" if subjects else message(no_subjects_message(), "error")
        first = subjects[0] if subjects else None
        return (who, note, gr.Dropdown(choices=subjects, value=first), gr.Dropdown(choices=subjects, value=first))

    # --- Generate

    def _generate_tab(self):
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                subject = gr.Dropdown(label="Subject", choices=[], elem_id="gen-subject", min_width=160)
                scene = gr.Dropdown(label="Scene", choices=[FREE_PROMPT, *PAPER_SCENES], value="in the snow",
                                    elem_id="gen-scene", min_width=160)
            prompt = gr.Textbox(label="Free prompt (when the scene is \"(free prompt)\")", elem_id="gen-prompt",
                                placeholder="a sks dog wearing a hat")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, min_width=100)
                steps = gr.Slider(1, 100, value=self.default_steps, step=1, label="Steps", min_width=140)
                count = gr.Slider(1, 4, value=1, step=1, label="Images", min_width=120)
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                surprise = gr.Button("Surprise me", elem_id="gen-surprise")
            status = gr.Markdown(elem_id="gen-status")
            out = gr.HTML(elem_id="gen-out")
        go.click(self.on_generate, [subject, scene, prompt, seed, steps, count], [out, status], queue=False)
        surprise.click(self.on_surprise, [subject, steps], [out, status], queue=False)
        return subject

    async def on_generate(self, subject_id, scene, prompt, seed, steps, count, request: gr.Request):
        try:
            caller = self._caller(request)
            record = await self.backend.subject(subject_id, caller)
            text = self.backend.prompt(record, None if scene == FREE_PROMPT else scene, prompt)
            first = int(seed if seed is not None else 0)
            if not 0 <= first <= MAX_SEED - 4:
                raise StudioError(f"The seed must be in 0..{MAX_SEED - 4}.")
            seeds = [first + i for i in range(int(count))]
            pngs = await self.backend.render(record, text, seeds, int(steps))
        except StudioError as e:
            return "", message(str(e), "error")
        done = f"{record.id} (version {record.version}): {len(pngs)} image(s)"
        return cards([(png, text, s) for png, s in zip(pngs, seeds)]), message(done, "ok")

    async def on_surprise(self, subject_id, steps, request: gr.Request):
        try:
            caller = self._caller(request)
            record = await self.backend.subject(subject_id, caller)
            scenes = random.sample(PAPER_SCENES, SURPRISE_SCENES)
            seed = secrets.randbelow(MAX_SEED)
            prompts = [self.backend.prompt(record, s, None) for s in scenes]
            pngs = await asyncio.gather(*[self.backend.render(record, p, [seed], int(steps)) for p in prompts])
        except StudioError as e:
            return "", message(str(e), "error")
        return cards([(p[0], t, seed) for p, t in zip(pngs, prompts)]), message(
            f"{record.id} in {SURPRISE_SCENES} scenes", "ok")

    # --- Compare

    def _compare_tab(self):
        with gr.Tab("Compare", id="compare"):
            gr.Markdown("Every registered version of one subject (its aliases), the same seed in each of the "
                        "paper's 15 scenes.")
            with gr.Row():
                subject = gr.Dropdown(label="Subject", choices=[], elem_id="cmp-subject", min_width=160)
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, min_width=100)
                steps = gr.Slider(1, 100, value=self.default_steps, step=1, label="Steps", min_width=140)
            go = gr.Button("Compare", variant="primary", elem_id="cmp-go")
            status = gr.Markdown(elem_id="cmp-status")
            grid = gr.HTML(elem_id="cmp-out")
        go.click(self.on_compare, [subject, seed, steps], [grid, status], queue=False)
        return subject

    async def on_compare(self, subject_id, seed, steps, request: gr.Request):
        try:
            caller = self._caller(request)
            await self.backend.subject(subject_id, caller)  # one the key may see
            methods = self.backend.methods(await self.backend.versions(subject_id))
            if not methods:
                raise StudioError(f"{subject_id!r} has no aliased versions to compare.")
            seed = int(seed or 0)
            any_record = next(iter(methods.values()))
            prompts = [self.backend.prompt(any_record, s, None) for s in PAPER_SCENES]
            gate = asyncio.Semaphore(COMPARE_CONCURRENCY)

            async def one(rec, prompt):
                async with gate:
                    return (await self.backend.render(rec, prompt, [seed], int(steps)))[0]

            rows = {m: await asyncio.gather(*[one(r, p) for p in prompts]) for m, r in methods.items()}
            photo = await self.backend.photo(any_record)
        except StudioError as e:
            return "", message(str(e), "error")
        return compare_grid(methods, rows, photo), message(
            f"{subject_id}: {', '.join(f'{m} (v{r.version})' for m, r in methods.items())}, seed {seed}", "ok")

    # --- Vote

    def _vote_tab(self):
        with gr.Tab("Vote", id="vote"):
            gr.Markdown("A blind pair: the same subject, scene and seed from two methods, in random order. "
                        "Answer both questions, then submit; the next pair follows.")
            pair = gr.HTML(elem_id="vote-pair")
            ballot = gr.Textbox(visible=False, elem_id="vote-ballot")
            text_q = gr.Radio(["left", "right"], label=V.QUESTIONS["text"], elem_id="vote-text")
            subject_q = gr.Radio(["left", "right"], label=V.QUESTIONS["subject"], elem_id="vote-subject")
            with gr.Row():
                submit = gr.Button("Submit vote", variant="primary", elem_id="vote-submit")
                new = gr.Button("New pair", elem_id="vote-new")
            status = gr.Markdown(elem_id="vote-status")
        outputs = [pair, ballot, text_q, subject_q, status]
        new.click(self.on_new_pair, None, outputs, queue=False)
        submit.click(self.on_vote, [ballot, text_q, subject_q], outputs, queue=False)

    async def on_new_pair(self, request: gr.Request, note: str = ""):
        try:
            caller = self._caller(request)
            ballot, left, right = await self._pair(caller, getattr(request, "session_hash", "") or "")
        except StudioError as e:
            return "", "", None, None, message(str(e), "error")
        shown = (f'<p>Text: <b id="vote-prompt">{html.escape(ballot.prompt)}</b></p><div class="studio-pair">'
                 f'<figure>{img(left, "left", elem_id="vote-left")}<figcaption>left</figcaption></figure>'
                 f'<figure>{img(right, "right", elem_id="vote-right")}<figcaption>right</figcaption></figure></div>')
        return shown, ballot.id, None, None, note

    async def _pair(self, caller, session: str) -> tuple[V.Ballot, bytes, bytes]:
        """Issue a ballot: a random subject with two or more methods, scene, seed and order."""
        candidates = []
        for record in await self.backend.subjects(caller):
            methods = self.backend.methods(await self.backend.versions(record.id))
            if len(methods) >= 2:
                candidates.append(methods)
        if not candidates:
            raise StudioError("No subject has two methods registered (e.g. comfusion and dreambooth) to compare.")
        methods = random.choice(candidates)
        (m1, r1), (m2, r2) = random.sample(sorted(methods.items()), 2)  # random pair, random order
        scene, seed = random.choice(PAPER_SCENES), secrets.randbelow(MAX_SEED)
        prompt = self.backend.prompt(r1, scene, None)
        left, right = await asyncio.gather(self.backend.render(r1, prompt, [seed], self.default_steps),
                                           self.backend.render(r2, prompt, [seed], self.default_steps))
        ballot = V.Ballot(id=V.VoteStore.new_id(), voter=caller.key_id, session=session, subject=r1.id, scene=scene,
                          prompt=prompt, seed=seed, steps=self.default_steps, left_method=m1, left_version=r1.version,
                          right_method=m2, right_version=r2.version)
        await asyncio.to_thread(self.store.issue, ballot)
        return ballot, left[0], right[0]

    async def on_vote(self, ballot_id, text_choice, subject_choice, request: gr.Request):
        try:
            caller = self._caller(request)
            if not ballot_id:
                raise StudioError("Get a pair first (New pair).")
            counted = await asyncio.to_thread(self.store.vote, ballot_id, caller.key_id, text_choice or "",
                                              subject_choice or "")
        except (StudioError, V.VoteError) as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), message(str(e), "error")
        total = await asyncio.to_thread(self.store.count)
        note = message(f"Vote counted ({total} in all). Next pair:" if counted else
                       "That vote was already counted. Next pair:", "ok")
        return await self.on_new_pair(request, note)

    # --- Results

    def _results_tab(self):
        with gr.Tab("Results", id="results"):
            gr.Markdown("Win rate of method A over method B (names in alphabetical order) per subject and "
                        "question, with Wilson 95% intervals. Export: [results.csv](export/results.csv) · "
                        "[votes.csv](export/votes.csv)")
            with gr.Row():
                refresh = gr.Button("Refresh", variant="primary", elem_id="res-refresh")
                to_mlflow = gr.Button("Log to MLflow", elem_id="res-mlflow")
            status = gr.Markdown(elem_id="res-status")
            chart = gr.HTML(elem_id="res-chart")
            table = gr.HTML(elem_id="res-table")
        refresh.click(self.on_results, None, [table, chart, status], queue=False)
        to_mlflow.click(self.on_log, None, [status], queue=False)

    async def on_results(self, request: gr.Request):
        try:
            self._caller(request)
        except StudioError as e:
            return "", "", message(str(e), "error")
        rows = await asyncio.to_thread(self.store.rows)
        table = V.results(rows)
        if not table:
            return "", "", message("No votes yet: cast some on the Vote page.")
        chart = await asyncio.to_thread(results_chart, table)
        return results_table(table), img(chart, "win rates", cls="", elem_id="res-chart-img"), message(
            f'<span id="res-count">{len(rows)}</span> votes', "ok")

    async def on_log(self, request: gr.Request):
        try:
            self._caller(request)
            rows = await asyncio.to_thread(self.store.rows)
            table = V.results(rows)
            if not table:
                raise StudioError("No votes yet: nothing to log.")
            run_id = await self.backend.log_results(table, V.results_csv(table), V.votes_csv(rows))
        except StudioError as e:
            return message(str(e), "error")
        except Exception as e:  # noqa: BLE001 - MLflow down
            return message(f"MLflow did not take the results ({type(e).__name__}); retry later.", "error")
        return message(f"Logged {len(rows)} votes to the evaluation run {run_id}.", "ok")


# ---------------------------------------------------------------------------------------
# grids, tables and charts


def compare_grid(methods: dict, rows: dict[str, list[bytes]], photo: bytes | None) -> str:
    """One row per method (label and version), one column per scene; the training photo first."""
    head = "".join(f"<th>{html.escape(s)}</th>" for s in PAPER_SCENES)
    body = []
    for i, (method, images) in enumerate(rows.items()):
        photo_cell = ""
        if i == 0:
            inner = img(photo, "training photo", elem_id="cmp-photo") if photo else "no photo on this machine"
            photo_cell = f'<td rowspan="{len(rows)}">{inner}<br>training photo</td>'
        cells = "".join(f"<td>{img(png, f'{method}: {s}')}</td>" for png, s in zip(images, PAPER_SCENES))
        label = f'<th class="cmp-method">{html.escape(method)}<br>v{methods[method].version}</th>'
        body.append(f"<tr>{photo_cell}{label}{cells}</tr>")
    return (f'<div class="studio-grid" id="cmp-grid"><table><tr><th>photo</th><th>method</th>{head}</tr>'
            f'{"".join(body)}</table></div>')


def results_table(table: list[dict]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("method A", "method B", "subject", "question", "votes", "A wins",
                                             "A win rate", "95% interval"))
    rows = "".join(
        f"<tr><td>{html.escape(r['method_a'])}</td><td>{html.escape(r['method_b'])}</td>"
        f"<td>{html.escape(r['subject'])}</td><td>{r['question']}</td><td class=\"res-votes\">{r['votes']}</td>"
        f"<td>{r['a_wins']}</td><td>{r['a_win_rate']:.0%}</td><td>{r['ci_low']:.0%}–{r['ci_high']:.0%}</td></tr>"
        for r in table)
    return f'<div style="overflow-x:auto"><table class="studio-table" id="res-rows"><tr>{head}</tr>{rows}</table></div>'


def results_chart(table: list[dict]) -> bytes:
    """A PNG: each pair's all-subjects win rate of A per question, with its Wilson interval."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in table if r["subject"] == V.ALL_SUBJECTS]
    labels = [f"{r['method_a']} vs {r['method_b']}\n{r['question']} (n={r['votes']})" for r in rows]
    rates = [r["a_win_rate"] for r in rows]
    errors = [[r["a_win_rate"] - r["ci_low"] for r in rows], [r["ci_high"] - r["a_win_rate"] for r in rows]]
    fig, ax = plt.subplots(figsize=(5.5, 0.6 + 0.55 * len(rows)), dpi=80)
    ax.barh(range(len(rows)), rates, xerr=errors, color="#ea580c", capsize=3)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of A (all subjects), 95% Wilson interval")
    ax.invert_yaxis()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# wiring


def start_studio(ingress, keys) -> Studio | None:
    """Build this replica's studio on the Ingress's registry, Generator handle and keys, and install it
    behind `/studio`. A studio that cannot start (e.g. its vote database) is logged; the API goes on."""
    settings = ingress.settings
    url = settings.votes_url or V.default_votes_url(settings.cache_dir)
    try:
        store = V.VoteStore(url)
        studio = Studio(AppBackend(ingress), keys, store, settings.default_steps)
    except Exception as e:  # noqa: BLE001 - the API must not go down with the studio
        log.error("studio disabled: %s: %s", type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        return None
    install(studio)
    return studio
