"""The Gradio demo: steered vs unsteered side by side (``steer demo``).

Two modules, so the model side can be tested without a browser:

* `steer.demo.engine` — no Gradio: one shared model behind a lock, the
  token-by-token side-by-side decoder (unsteered, steered, and the KL between
  them per step), monitor highlights, edit-line checks, request bounds, exports.
* `steer.demo.app` — the Gradio page over an engine, and `serve` (what
  ``steer demo`` and ``python demos/app.py`` start).

The app lives inside the package (not only in ``demos/``) so that ``steer
demo`` imports it from any install; ``demos/app.py`` is the runnable entry
point the repository layout promises.
"""
