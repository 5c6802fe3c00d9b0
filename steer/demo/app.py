"""The Gradio page: prompt, edit list, unsteered | steered side by side, monitor, KL, export.

``serve()`` is what ``steer demo`` (and ``python demos/app.py``) runs: it loads
the model and its SAEs once (default: the embedded SmolLM2-135M-Instruct and
its shipped SAEs, one per site — or the one default SAE where none ship),
builds the page over a `DemoEngine`, and serves it on 127.0.0.1 unless told otherwise, with Gradio's queue limiting how many
generations run at once (``concurrency``; their continuations are decoded as
rows of one forward call per step, see `steer.demo.engine`) and how many may wait.

Offline by construction: Gradio's analytics and version check are off
(``GRADIO_ANALYTICS_ENABLED=False`` before Gradio is imported, and
``analytics_enabled=False``), no share link, no server-side rendering, and the
default theme uses fonts shipped in the Gradio wheel — the page loads nothing
from outside the server.

Every user mistake (a bad edit line, a prompt over the bounds, an edit that has
no exact lowering for the export target) is shown as the `SteerError`'s one
line, never a stack trace. Gradio is imported only by `build_app` / `serve`,
so ``steer demo --help`` and the helpers here need no Gradio.

The feature search reads the feature atlas (`steer.discover.atlas`) of the
SAE at the site picked in the panel: a given atlas file (matched to its SAE by
the atlas's own record of it), or for a default SAE its default atlas, built in
the background on first use (the panel says so until it is ready). The feature
id, its card (labels, p99) and the line the controls add are all the chosen
site's; a line for a site other than the default one says ``site S``.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from steer.demo.engine import (
    EXPORT_TARGETS,
    DemoEngine,
    Frame,
    Limits,
    LineCheck,
    default_sae_names,
)
from steer.demo.search import FeatureSearch, card_html, match_atlases
from steer.errors import SteerError
from steer.generate import Sampling
from steer.ops import dsl_verbs
from steer.ops.amounts import Slider

SCOPES = ("all", "prompt", "generation")


CONTROLS: dict[str, Slider] = {word: verb.slider for word, verb in dsl_verbs().items() if verb.slider is not None}
"""The verbs the "add an edit" controls offer on a feature, and what each one's slider means — declared by the
operation modules (`steer.ops`)."""


def edit_line(operation: str, feature, strength: float, scope: str = "all", site: str | None = None) -> str:
    """The DSL line the controls stand for (``site``: the SAE's site, when not the default one); a `SteerError` for a
    missing or bad feature id or choice."""
    if operation not in CONTROLS:
        raise SteerError(f"unknown operation {operation!r}; allowed: {', '.join(CONTROLS)}", where="operation")
    if scope not in SCOPES:
        raise SteerError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}", where="scope")
    if feature is None or feature == "" or float(feature) != int(float(feature)) or int(float(feature)) < 0:
        raise SteerError("pick a feature (an integer ≥ 0) first: search the atlas or type its id", where="feature")
    line = CONTROLS[operation].template.format(i=int(float(feature)), s=float(strength))
    return line + (f" scope {scope}" if scope != "all" else "") + (f" site {site}" if site else "")


def append_line(edits_text: str, line: str) -> str:
    edits_text = edits_text or ""
    return edits_text + ("" if not edits_text or edits_text.endswith("\n") else "\n") + line


def checks_html(checks: list[LineCheck]) -> str:
    """The edit list's per-line verdicts (messages escaped, errors marked)."""
    if not checks:
        return '<div class="steer-checks">no edits: both columns will be the unsteered model</div>'
    rows = []
    for c in checks:
        kind = "steer-error" if c.error else "steer-ok"
        rows.append(f'<div class="{kind}">line {c.line}: {html.escape(c.error or "ok")}</div>')
    return '<div class="steer-checks">' + "".join(rows) + "</div>"


def error_html(exc: SteerError) -> str:
    return f'<div class="steer-checks"><div class="steer-error">{html.escape(str(exc))}</div></div>'


def highlights(pieces: tuple[str, ...], activations: tuple[float, ...], scale: float) -> list[tuple[str, float | None]]:
    """(token text, activation / scale in [0, 1], or None where the feature is silent) per shown token."""
    shown = []
    for j, piece in enumerate(pieces):
        if not piece:
            continue  # special tokens (end of turn)
        value = activations[j] if j < len(activations) else 0.0
        shown.append((piece, min(1.0, value / scale) if value > 0 and scale > 0 else None))
    return shown


def kl_summary(frame: Frame) -> str:
    if not frame.kl:
        return ""
    top = max(range(len(frame.kl)), key=frame.kl.__getitem__)
    token = frame.steered_pieces[top] if top < len(frame.steered_pieces) else ""
    return (f"KL(unsteered ‖ steered) of the next-token distributions at each steered step, both given the same "
            f"prefix (prompt + steered tokens so far), temperature 1: mean **{sum(frame.kl) / len(frame.kl):.3g}** nats, "
            f"max **{frame.kl[top]:.3g}** nats at step {top + 1} (steered token {token!r}).")


def monitor_summary(frame: Frame) -> str:
    if frame.monitor_feature is None:
        return "No feature monitored: give a feature id, or add a feature edit (its feature is monitored)."
    parts = []
    for name, acts in (("unsteered", frame.unsteered_activations), ("steered", frame.steered_activations)):
        fired = sum(a > 0 for a in acts)
        parts.append(f"{name}: fires on {fired} of {len(acts)} tokens (max {max(acts, default=0.0):.3g})")
    at = f"at {frame.monitor_site} — " if frame.monitor_site else ""
    return f"Feature {frame.monitor_feature} — {at}" + "; ".join(parts)


def _number(value, kind, where: str):
    """A control's value as ``kind`` (an API client may send anything); a `SteerError` if it is not one."""
    try:
        number = kind(float(value))
    except (TypeError, ValueError, OverflowError):
        raise SteerError(f"expected a number, got {value!r}", where=where) from None
    if not math.isfinite(number):
        raise SteerError(f"expected a finite number, got {value!r}", where=where)
    if kind is int and number != float(value):
        raise SteerError(f"expected an integer, got {value!r}", where=where)
    return number


_MONITOR = re.compile(r"([0-9]+)(?:\s+site\s+(\S+))?")


def monitor_choice(engine: DemoEngine, edits_text: str, value) -> tuple[int | None, str | None]:
    """The monitored feature and its site: the given ``J`` or ``J site SITE`` (``J`` alone: at the site of the first
    edit naming feature J, else the default site), else the first feature the edit list names at its edit's site,
    else ``(None, None)``."""
    try:
        edits = engine.edits(edits_text or "")
    except SteerError:
        edits = ()
    if value is not None and str(value).strip():
        text = str(value).strip()
        match = _MONITOR.fullmatch(text)
        if not match:
            raise SteerError(f"expected a feature id (an integer ≥ 0), or `J site SITE`, got {text!r}",
                             where="monitor feature")
        feature = int(match.group(1))
        if match.group(2):
            return feature, engine.site_name(match.group(2), where="monitor site")
        named = next((e for e in edits if e.feature == feature), None)
        return feature, (engine.site_of(named) if named is not None else None) or engine.site
    first = next((e for e in edits if e.feature is not None), None)
    if first is None:
        return None, None
    return first.feature, engine.site_of(first) or engine.site


CSS = """
.steer-checks { font-family: monospace; font-size: 0.9em; }
.steer-error { color: #b91c1c; }
.steer-ok { color: #15803d; }
.steer-card code { font-size: 0.9em; }
"""


def build_app(engine: DemoEngine, search: FeatureSearch | dict[str, FeatureSearch] | None = None, *,
              export_dir: Path | None = None, downloads: Path | None = None):
    """The page over ``engine`` (not launched); ``search``: the atlas search of the default site's SAE, or one per
    site (canonical site name → search; a site without one has none); ``downloads``: Gradio's cache directory when
    it is this server's own (`serve`), whose old export zips are then reaped (`reap_downloads`)."""
    import gradio as gr
    import pandas as pd

    searches = {engine.site: search} if isinstance(search, FeatureSearch) else dict(search or {})
    for name in engine.sites:
        searches.setdefault(name, FeatureSearch())
    multi = len(engine.sites) > 1
    export_dir = Path(export_dir or tempfile.mkdtemp(prefix="steer-demo-exports-"))
    limits = engine.limits

    def search_at(name):
        return searches.get(name or engine.site) or FeatureSearch()

    def on_check(edits_text):
        try:
            return checks_html(engine.check_lines(edits_text or ""))
        except SteerError as exc:
            return error_html(exc)

    def on_generate(prompt, edits_text, monitor_feature, max_new_tokens, temperature, top_p, seed, chat):
        empty = ("", "", [], [], "", pd.DataFrame({"step": [], "KL (nats)": []}), "")
        try:
            checks = engine.check_lines(edits_text or "")
            if any(c.error for c in checks):
                yield (*empty, checks_html(checks))
                return
            sampling = Sampling(max_new_tokens=_number(max_new_tokens, int, "max new tokens"),
                                temperature=_number(temperature, float, "temperature"),
                                top_p=_number(top_p, float, "top-p"), seed=_number(seed, int, "seed"))
            feature, monitor_site = monitor_choice(engine, edits_text, monitor_feature)
            for frame in engine.stream(prompt or "", edits_text or "", sampling, monitor_feature=feature,
                                       monitor_site=monitor_site, chat=bool(chat)):
                scale = max((*frame.unsteered_activations, *frame.steered_activations, 0.0))
                texts = (frame.unsteered, frame.steered,
                         highlights(frame.unsteered_pieces, frame.unsteered_activations, scale),
                         highlights(frame.steered_pieces, frame.steered_activations, scale))
                if frame.done:
                    plot = pd.DataFrame({"step": list(range(1, len(frame.kl) + 1)), "KL (nats)": list(frame.kl)})
                    yield (*texts, monitor_summary(frame), plot, kl_summary(frame), checks_html(checks))
                else:
                    yield (*texts, gr.skip(), gr.skip(), kl_summary(frame), gr.skip())
        except SteerError as exc:
            yield (*empty, error_html(exc))

    def on_add(edits_text, operation, feature, strength, scope, site=None):
        try:
            site = engine.site_name(site or None)
            text = append_line(edits_text, edit_line(operation, feature, strength, scope,
                                                     site if site != engine.site else None))
        except SteerError as exc:
            return edits_text, error_html(exc)
        return text, on_check(text)

    def on_operation(operation):
        c = CONTROLS[operation]
        return gr.Slider(minimum=c.minimum, maximum=c.maximum, step=c.step, value=c.default, label=c.label,
                         interactive=c.minimum != c.maximum)

    def on_site(site):
        state = search_at(site)
        state.prepare()  # a default SAE's atlas not built yet: start it now
        card_text = f"<div>{html.escape(state.state)}</div>" if state.atlas is None else ""
        sae = engine.saes.get(site, engine.sae)
        return (gr.Dropdown(choices=[], value=None), card_text,
                gr.Number(value=None, maximum=sae.d_sae - 1, label=f"feature id (0..{sae.d_sae - 1} at {site})"))

    def on_search(text, site=None):
        try:
            cards = search_at(site).find(text or "")
        except SteerError as exc:
            return gr.Dropdown(choices=[], value=None), error_html(exc)
        if not cards:
            return gr.Dropdown(choices=[], value=None), f"<div>no feature matches {html.escape(text)!s}</div>"
        choices = [(f"{c.id}: " + " ".join(t.strip() for t, _ in c.promoted[:4]) + f" (p99 {c.p99:.2g})", c.id) for c in cards]
        return gr.Dropdown(choices=choices, value=cards[0].id), card_html(cards[0])

    def on_pick(feature, site=None):
        if feature is None:
            return gr.skip(), gr.skip()
        try:
            return int(feature), card_html(search_at(site).card(int(feature)))
        except SteerError as exc:
            return int(feature), error_html(exc)

    def on_export(edits_text, target):
        try:
            result = engine.export(edits_text or "", target, export_dir)
        except SteerError as exc:
            return None, f"steer: error: {exc}"
        for old in export_dir.glob("*.zip"):
            if old != result.archive:
                old.unlink(missing_ok=True)  # Gradio keeps its own copy for the download; ours is only the latest
        if downloads is not None:
            reap_downloads(downloads, newest=result.archive)
        return str(result.archive), result.report

    with gr.Blocks(title="steer — steered vs unsteered", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        if multi:
            saes_text = ", ".join(f"`{name}` ({sae.d_sae} features)" for name, sae in engine.saes.items())
            gr.Markdown(f"## steer — steered vs unsteered\nModel `{engine.model_name}`; SAEs at {saes_text}. Edits "
                        f"are steer's one-line DSL, one per line; `site S` picks the SAE at S (default `{engine.site}`).")
        else:
            gr.Markdown(f"## steer — steered vs unsteered\nModel `{engine.model_name}`; SAE at `{engine.site}` "
                        f"({engine.sae.d_sae} features). Edits are steer's one-line DSL, one per line.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label=f"Prompt (at most {limits.max_prompt_chars} characters)", lines=3,
                                    max_length=limits.max_prompt_chars, value="Tell me about your weekend.", elem_id="prompt")
                edits = gr.Textbox(label="Edits (DSL, one per line)", lines=4, elem_id="edits",
                                   placeholder="steer feature 1021 by +4 units feature\nsuppress feature 12 by 80% scope generation"
                                   + (f"\nablate feature 7 site {engine.sites[1]}" if multi else ""))
                checks = gr.HTML(checks_html([]), elem_id="edit-checks")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Sampling", open=False):
                    max_new_tokens = gr.Slider(1, limits.max_new_tokens, value=min(48, limits.max_new_tokens), step=1,
                                               label="max new tokens", elem_id="max-new-tokens")
                    temperature = gr.Slider(0, limits.max_temperature, value=0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
                    seed = gr.Number(0, precision=0, label="seed (shared by both columns)")
                    chat = gr.Checkbox(True, label="chat template")
            with gr.Column(scale=2):
                gr.Markdown("#### Add an edit")
                site = gr.Dropdown(list(engine.sites), value=engine.site, label="site (the SAE whose features you search "
                                   "and add)", interactive=True, visible=multi, elem_id="site")
                with gr.Row():
                    query = gr.Textbox(label="Search features (words, or an id)", scale=3, elem_id="search")
                    find = gr.Button("Search", scale=1, elem_id="search-button")
                results = gr.Dropdown(label="Matching features", choices=[], interactive=True)
                first_search = search_at(engine.site)
                card = gr.HTML(f"<div>{html.escape(first_search.state)}</div>" if first_search.atlas is None else "",
                               elem_id="feature-card")
                feature = gr.Number(label="feature id", precision=0, minimum=0, maximum=engine.sae.d_sae - 1, elem_id="feature-id")
                operation = gr.Dropdown(list(CONTROLS), value="steer", label="operation", elem_id="operation")
                first = CONTROLS["steer"]
                strength = gr.Slider(first.minimum, first.maximum, value=first.default, step=first.step, label=first.label,
                                     elem_id="strength")
                scope = gr.Radio(list(SCOPES), value="all", label="scope (which tokens the edit touches)")
                add = gr.Button("Add edit line", elem_id="add-edit")
        with gr.Row(equal_height=True):
            unsteered = gr.Textbox(label="Unsteered", lines=10, interactive=False, elem_id="unsteered")
            steered = gr.Textbox(label="Steered", lines=10, interactive=False, elem_id="steered")
        with gr.Accordion("Monitor: generated tokens coloured by a feature's activation", open=True):
            monitor = gr.Textbox(label="monitored feature id" + (" (J, or J site SITE)" if multi else ""),
                                 placeholder="blank: the first feature of the edit list"
                                 + (f" (at its edit's site); J alone: at {engine.site}" if multi else ""),
                                 elem_id="monitor-feature")
            with gr.Row():
                monitor_unsteered = gr.HighlightedText(label="unsteered", show_legend=False, elem_id="monitor-unsteered")
                monitor_steered = gr.HighlightedText(label="steered", show_legend=False, elem_id="monitor-steered")
            monitor_text = gr.Markdown(elem_id="monitor-summary")
        with gr.Accordion("Side effect: KL(unsteered ‖ steered) per step", open=True):
            kl_plot = gr.LinePlot(pd.DataFrame({"step": [], "KL (nats)": []}), x="step", y="KL (nats)", height=220,
                                  label="KL per steered step (nats)")
            kl_text = gr.Markdown(elem_id="kl-summary")
        with gr.Accordion("Export the edits (with their verify report)", open=False):
            target = gr.Radio(list(EXPORT_TARGETS), value=EXPORT_TARGETS[0], label="target",
                              info="weights: merged HF checkpoint; adapter: PEFT LoRA; cvec: llama.cpp control vector; "
                                   "pack: the plan + the SAE rows it uses")
            export = gr.Button("Export and verify")
            archive = gr.File(label="download (zip: artifact/ and verify_report.txt)", interactive=False)
            report = gr.Textbox(label="verify report", lines=6, interactive=False)

        edits.change(on_check, edits, checks, trigger_mode="always_last", show_progress="hidden", api_name="check_edits",
                     concurrency_limit=None)
        generate.click(on_generate, [prompt, edits, monitor, max_new_tokens, temperature, top_p, seed, chat],
                       [unsteered, steered, monitor_unsteered, monitor_steered, monitor_text, kl_plot, kl_text, checks],
                       api_name="generate")
        add.click(on_add, [edits, operation, feature, strength, scope, site], [edits, checks], api_name="add_edit",
                  concurrency_limit=None)
        site.change(on_site, site, [results, card, feature], show_progress="hidden", api_name=False, concurrency_limit=None)
        operation.change(on_operation, operation, strength, show_progress="hidden", api_name=False, concurrency_limit=None)
        find.click(on_search, [query, site], [results, card], api_name="search", concurrency_limit=None)
        query.submit(on_search, [query, site], [results, card], api_name=False, concurrency_limit=None)
        results.change(on_pick, [results, site], [feature, card], show_progress="hidden", api_name=False,
                       concurrency_limit=None)
        export.click(on_export, [edits, target], [archive, report], api_name="export", concurrency_limit=1)
    return app


KEEP_DOWNLOADS = 4
"""Export zips the server keeps for download (the newest); older ones are deleted when a new export is made."""


def reap_downloads(cache: Path, *, newest: Path | None = None, keep: int = KEEP_DOWNLOADS) -> list[Path]:
    """Delete all but the ``keep`` newest export zips in ``cache``, Gradio's cache when it is this server's own
    (`serve`): Gradio copies each zip there for the download, and many exports would otherwise fill the disk.
    Returns the deleted paths. ``newest`` (the zip just made, not yet copied) counts as one of the kept."""
    zips = sorted(cache.rglob("steer-*.zip"), key=lambda p: p.stat().st_mtime, reverse=True)
    doomed = zips[max(0, keep - (1 if newest is not None else 0)):]
    for path in doomed:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # Gradio's per-file folder, now empty
    return doomed


def serve(*, model: str | None = None, sae: str | list[str] | None = None, atlas: str | list[str] | None = None,
          host: str = "127.0.0.1", port: int = 7860, concurrency: int = 4, max_waiting: int = 64,
          limits: Limits = Limits()) -> None:
    """Load, build and serve the demo until interrupted.

    ``sae``: one SAE path or name, or several (one per site; the first one's site is the edit list's default);
    default: `default_sae_names` (every shipped SAE). ``atlas``: atlas files for the search panel, each matched to
    its SAE (`match_atlases`), or ``none``; a default SAE without one gets its default atlas, built in the
    background on first use.

    Everything the server writes — its export zips and Gradio's cache of the files it hands out — lives in one
    temp directory of its own, deleted on exit; Gradio serves files from that cache only (no other
    ``allowed_paths``), and no URL through its ``file=`` route (`OwnFilesOnly`). More than ``concurrency`` running
    plus ``max_waiting`` queued requests are turned away with Gradio's "queue is full" message."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio reads it
    if importlib.util.find_spec("gradio") is None:
        raise SteerError("the demo needs Gradio: pip install -e '.[demo]'", where="steer demo")
    if concurrency < 1:
        raise SteerError(f"concurrency must be ≥ 1, got {concurrency}", where="--concurrency")
    if max_waiting < 0:
        raise SteerError(f"must be ≥ 0, got {max_waiting}", where="--max-waiting")
    _check_port(host, port)  # before the model loads: a taken port fails in a second, not after the load
    names = [sae] if isinstance(sae, str) else list(sae or default_sae_names())
    atlases = [atlas] if isinstance(atlas, str) else list(atlas or [])
    if "none" in atlases and len(atlases) > 1:
        raise SteerError("`none` turns the feature search off: give it alone", where="--atlas")
    from steer.discover.atlas import open_atlas

    opened = [open_atlas(a) for a in atlases if a != "none"]  # a bad file fails first
    engine = DemoEngine.load(model, names, limits=limits)
    searches = match_atlases(engine, opened)
    if atlases == ["none"]:
        for name in engine.sites:
            searches[name] = FeatureSearch()
            searches[name].state = "feature search is off (--atlas none); type a feature id"
    else:
        from steer.saes import is_default_name

        defaults = {name: given for name, given in zip(engine.sites, names)
                    if is_default_name(given) and name not in searches}
        if defaults:  # after the load: the default SAEs exist (the one-site fallback trained on first use) by now
            searches.update(FeatureSearch.defaults(defaults))
    own = Path(tempfile.mkdtemp(prefix="steer-demo-"))
    downloads = own / "downloads"
    os.environ["GRADIO_TEMP_DIR"] = str(downloads)  # Gradio's cache: read when it copies a file, not at import
    app = build_app(engine, searches, export_dir=own / "exports", downloads=downloads)
    app.queue(default_concurrency_limit=concurrency, max_size=max_waiting)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: Gradio closes, the export directory goes
    print(f"steer demo: serving {engine.model_name} on http://{host}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)
    from starlette.middleware import Middleware

    try:
        app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False, pwa=False,
                   show_error=False, quiet=True, footer_links=["api"], css=CSS,
                   app_kwargs={"middleware": [Middleware(OwnFilesOnly)]})
    except OSError as exc:
        raise SteerError(f"cannot serve on {host}:{port}: {exc}", where="--port") from None
    finally:
        shutil.rmtree(own, ignore_errors=True)


class OwnFilesOnly:
    """ASGI middleware: Gradio's ``file=`` and ``proxy=`` routes would fetch a public URL for any caller and hand
    it out; the demo hands out only its own files, so such requests get 403 before Gradio sees them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            from urllib.parse import unquote

            path = unquote(scope.get("path", ""))
            _, marker, rest = path.partition("/file=") if "/file=" in path else path.partition("/proxy=")
            if marker and (marker == "/proxy=" or "://" in rest or rest.lower().startswith(("http:", "https:"))):
                from starlette.responses import PlainTextResponse

                await PlainTextResponse("steer demo: serves only its own files", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SteerError(f"cannot serve on {host}:{port}: {exc.strerror or exc}", where="--port") from None
