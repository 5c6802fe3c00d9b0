"""Package trained SAEs for shipping: 16-bit SAELens v6 directories plus a manifest (`steer.sae.shipped` reads it).

    python -m steer.train.ship TRAINED_DIR --recipe configs/smollm2-135m-multidepth.yaml --metrics METRICS.json

``TRAINED_DIR`` is what ``steer sae train`` wrote for a multi-site recipe (one
directory per site); ``METRICS.json`` maps each site to its ``steer sae eval
--json`` output (measured on the 16-bit copies: `ship_saes` writes them first,
``--metrics`` is then given to a second call that only rewrites the manifest).
The manifest holds the recipe (as resolved, and the file it came from), the
corpus's per-source package, licence and sha256 (`steer.data.corpus.corpus_hashes`),
each SAE's training record, held-out metrics and the sha256 of each of its
files.

Never trains and never evaluates; writes only under ``out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from steer.sae import load_sae, save_sae
from steer.sae.shipped import MANIFEST, SHIPPED_DIR, file_hashes
from steer.train.config import load_recipe, recipe_hash

ROOT = Path(__file__).resolve().parents[2]


def ship_saes(trained: Path, recipe_file: Path, *, default_site: str, out: Path = SHIPPED_DIR,
              metrics: dict[str, dict] | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``out/<site>/`` (``dtype`` weights) for every site of the recipe, and ``out/manifest.json``."""
    from steer.data.corpus import corpus_hashes, open_corpus

    config = load_recipe(recipe_file)
    sites = list(config.site_names)
    if default_site not in sites:
        raise ValueError(f"default site {default_site} is not one of the recipe's sites {sites}")
    previous = _read_manifest(out)
    saes = {}
    for site in sites:
        target = out / site
        if metrics is None or not (target / "cfg.json").is_file():
            save_sae(load_sae(trained / site).to(dtype=dtype), target, overwrite=True)
        training = load_sae(target).metadata.get("steer_training", {})
        saes[site] = {
            "path": site, "files": file_hashes(target),
            "tokens_seen": training.get("tokens_seen"), "steps": training.get("steps"),
            "wall_time_s": training.get("wall_time_s"),
            "held_out": (metrics or {}).get(site) or previous.get("saes", {}).get(site, {}).get("held_out"),
        }
    recipe_name = recipe_file.resolve().relative_to(ROOT).as_posix() if recipe_file.resolve().is_relative_to(ROOT) else str(recipe_file)
    manifest = {
        "model": config.model, "default_site": default_site, "dtype": str(dtype).removeprefix("torch."),
        "recipe_file": recipe_name, "recipe": config.to_dict(), "recipe_hash": recipe_hash(config),
        "corpus": {"name": config.corpus, "held_out": config.held_out, "sources": corpus_hashes(open_corpus(config.corpus))},
        "saes": saes,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out


def _read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trained", type=Path, help="the multi-site training output (one directory per site)")
    parser.add_argument("--recipe", type=Path, required=True, help="the recipe that trained them")
    parser.add_argument("--default-site", default="resid_post.10", help="the site `sae: default` names")
    parser.add_argument("--metrics", type=Path, help="JSON: site -> `steer sae eval --json` output")
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR)
    args = parser.parse_args()
    metrics = json.loads(args.metrics.read_text()) if args.metrics else None
    print(ship_saes(args.trained, args.recipe, default_site=args.default_site, out=args.out, metrics=metrics))


if __name__ == "__main__":
    main()
