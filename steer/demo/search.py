"""The demo's feature search: an atlas per SAE site (opened from the cache, or built once in the background),
feature cards, and the matching of ``--atlas`` files to the demo's SAEs."""

from __future__ import annotations

import html
import queue
import sys
import threading
from pathlib import Path

from steer.demo.engine import DemoEngine
from steer.errors import SteerError


class FeatureSearch:
    """The atlas behind the search panel: ready, being built, or unavailable (with the reason)."""

    def __init__(self):
        self.atlas = None
        self.state = "no feature atlas for this SAE: start the demo with --atlas FILE (built by `steer features index`)"

    @classmethod
    def open(cls, path) -> "FeatureSearch":
        from steer.discover.atlas import open_atlas

        search = cls()
        search.atlas = open_atlas(path)
        return search

    @classmethod
    def default(cls) -> "FeatureSearch":
        """The default SAE's atlas: opened when cached, else built in a background thread."""
        search = cls()
        try:
            from steer.discover.atlas import default_atlas
        except ImportError as exc:
            search.state = f"the feature atlas is unavailable in this install ({exc})"
            return search
        search.state = "the feature atlas is being built (first run only, a few minutes); search works once it is ready"

        def build():
            try:
                from steer.discover.atlas import open_atlas

                search.atlas = open_atlas(default_atlas(progress=True))
            except SteerError as exc:
                search.state = f"the feature atlas is unavailable: {exc}"

        threading.Thread(target=build, name="steer-atlas", daemon=True).start()
        return search

    @classmethod
    def defaults(cls, names: dict[str, str]) -> dict[str, FeatureSearch]:
        """The default atlases of default SAEs (site → ``default`` / ``default:SITE``). ``default``'s is opened or
        built at once, in the background, as ever; another site's is opened when cached, else built when that site
        is first picked or searched — one build at a time (`_in_background`), so four sites do not load two cores
        for an hour before anyone asks."""
        from steer.saes import DEFAULT_SAE

        if list(names.values()) == [DEFAULT_SAE]:
            return {site: cls.default() for site in names}  # the one default SAE: the default atlas, as ever
        searches = {site: cls() for site in names}
        try:
            from steer.discover.atlas import default_atlas  # noqa: F401 (is the atlas available at all?)
        except ImportError as exc:
            for search in searches.values():
                search.state = f"the feature atlas is unavailable in this install ({exc})"
            return searches
        for site, name in names.items():
            search = searches[site]
            search._name = name
            if name == DEFAULT_SAE:
                search.prepare()
            else:
                search.state = (f"the feature atlas of {name} is built when you first search it (a few minutes, once); "
                                "search works once it is ready")
                _in_background(lambda search=search, name=name: search._open(name, build=False))
        return searches

    _name: str | None = None
    """The default SAE name whose atlas this search may still open or build (None: nothing to do)."""

    def prepare(self) -> None:
        """Start building this default SAE's atlas in the background if it is neither open nor on its way."""
        name = self._name
        if self.atlas is None and name is not None:
            self._name = None  # once
            self.state = (f"the feature atlas of {name} is being built (first run only, a few minutes); search works "
                          "once it is ready")
            _in_background(lambda: self._open(name, build=True))

    def _open(self, name: str, *, build: bool) -> None:
        """Open ``name``'s default atlas (``build``: building it first if need be; else only if it is cached)."""
        from steer.discover.atlas import open_atlas

        if self.atlas is not None:
            return
        try:
            path = default_atlas_of(name, progress=True, build=build)
            if path is not None:
                self.atlas = open_atlas(path)
                self._name = None
        except SteerError as exc:
            self.state = f"the feature atlas is unavailable: {exc}"
            self._name = None

    def find(self, text: str, limit: int = 20):
        if self.atlas is None:
            self.prepare()
            raise SteerError(self.state, where="feature search")
        if text.strip().isdigit():
            return [self.atlas.feature(int(text.strip()))]
        return self.atlas.search(text, limit=limit)

    def card(self, feature: int):
        if self.atlas is None:
            self.prepare()
            raise SteerError(self.state, where="feature search")
        return self.atlas.feature(int(feature))


_BACKGROUND: queue.Queue | None = None
_BACKGROUND_LOCK = threading.Lock()


def _in_background(job) -> None:
    """Run ``job`` on the demo's one atlas thread (a daemon: it never holds up the server's exit), after the jobs
    before it."""
    global _BACKGROUND
    with _BACKGROUND_LOCK:
        if _BACKGROUND is None:
            _BACKGROUND = queue.Queue()

            def work(jobs: queue.Queue) -> None:
                while True:
                    job = jobs.get()
                    try:
                        job()
                    except Exception as exc:  # noqa: BLE001 (one failed atlas must not stop the others)
                        print(f"steer demo: feature atlas: {exc}", file=sys.stderr, flush=True)
                    finally:
                        jobs.task_done()

            threading.Thread(target=work, args=(_BACKGROUND,), name="steer-atlas", daemon=True).start()
        _BACKGROUND.put(job)


def default_atlas_of(name: str, *, progress: bool = True, build: bool = True) -> Path | None:
    """The default atlas of the default SAE ``name`` (``default`` or ``default:SITE``): built on the default model and
    corpus like `steer.discover.atlas.default_atlas` (which is the one for ``default``), cached, found again by the
    SAE's files. ``build=False``: None when it is not built yet."""
    from steer.discover.atlas import (
        DEFAULT_TOKENS,
        build_atlas,
        default_atlas,
        default_atlas_path,
    )
    from steer.sae import load_sae
    from steer.saes import DEFAULT_SAE, default_sae_dir

    if name == DEFAULT_SAE and build:
        return default_atlas(progress=progress)
    sae = load_sae(default_sae_dir(name, progress=progress))  # as default_atlas reads it: the cache key is the files'
    path = default_atlas_path(sae)
    if not path.is_file():
        if not build:
            return None
        from steer.models.loading import DEFAULT_MODEL, load_model

        if progress:
            print(f"steer: building the feature atlas of {name} into {path} — once", file=sys.stderr)
        model, tokenizer = load_model(DEFAULT_MODEL)
        build_atlas(model, tokenizer, sae, "default", tokens=DEFAULT_TOKENS, out=path, progress=progress,
                    model_name=DEFAULT_MODEL)
    return path


def match_atlases(engine: DemoEngine, atlases: list) -> dict[str, FeatureSearch]:
    """Given atlases (opened `Atlas`es) by the site of the SAE each was built for: the SAE whose content hash the atlas
    records, else the one at the site it records; with one SAE and one atlas, that SAE's. A `SteerError` for an atlas
    no SAE of the demo matches, or two for one site."""
    hashes = {sae.content_hash(): site for site, sae in engine.saes.items()}
    searches: dict[str, FeatureSearch] = {}
    for atlas in atlases:
        if len(atlases) == 1 and len(engine.saes) == 1:
            site = engine.site
        else:
            site = hashes.get(atlas.metadata.get("sae_hash")) or atlas.metadata.get("site")
            if site not in engine.saes:
                raise SteerError(f"built for an SAE at {atlas.metadata.get('site')} that the demo does not load (its "
                                 f"SAEs read at {', '.join(engine.sites)})", where=f"--atlas {atlas.path}")
        if site in searches:
            raise SteerError(f"a second atlas for the SAE at {site}", where=f"--atlas {atlas.path}")
        searches[site] = FeatureSearch()
        searches[site].atlas = atlas
    return searches


def card_html(card) -> str:
    """A feature card: statistics, top promoted/suppressed tokens, top contexts with the activations shaded."""
    def tokens(pairs):
        return ", ".join(f"<code>{html.escape(t)}</code> {v:+.2f}" for t, v in pairs[:8]) or "—"

    rows = [f"<b>feature {card.id}</b> — fires on {100 * card.density:.3g}% of tokens; p99 {card.p99:.3g}, "
            f"max {card.max_activation:.3g}",
            f"<div>promotes: {tokens(card.promoted)}</div>", f"<div>suppresses: {tokens(card.suppressed)}</div>",
            "<div>top contexts:</div><ol>"]
    for context in card.contexts[:5]:
        peak = context.max_activation or 1.0
        spans = "".join(
            f'<span style="background: rgba(255, 120, 0, {max(0.0, a) / peak:.2f})">{html.escape(t)}</span>'
            for t, a in zip(context.tokens, context.activations))
        rows.append(f"<li>{spans}</li>")
    return '<div class="steer-card">' + "".join(rows) + "</ol></div>"
