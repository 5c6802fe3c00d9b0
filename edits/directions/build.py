"""Rebuild the bundled steering directions from their contrast prompts.

    python edits/directions/build.py

writes ``smollm2-135m-instruct.safetensors`` beside this file. Each direction is
a mean difference of activations (steer.discover.directions) between prompts
about a concept and matched prompts without it, at the site its edit uses.
The test suite recomputes them and checks the file.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

CONTRASTS = {
    "weddings": {
        "site": "resid_post.10",
        "positive": [
            "I love weddings. The bride and groom said their vows at the wedding ceremony.",
            "Wedding bells rang as the couple married in front of their families.",
            "The wedding dress, the rings, the cake: everything was ready for the marriage.",
            "They danced at the wedding reception after the ceremony.",
        ],
        "negative": [
            "I went to the shop. The clerk and the customer talked at the counter.",
            "Bells rang as the workers went home in front of their houses.",
            "The office, the desks, the printer: everything was ready for the meeting.",
            "They talked at the station after the train arrived.",
        ],
    },
}
MODEL = "smollm2-135m-instruct"
OUT = Path(__file__).with_name(f"{MODEL}.safetensors")


def build(model, tokenizer) -> dict:
    from steer.discover.directions import mean_difference

    return {name: mean_difference(model, tokenizer, c["positive"], c["negative"], c["site"]).contiguous()
            for name, c in CONTRASTS.items()}


if __name__ == "__main__":
    import steer

    model, tokenizer = steer.load_model(MODEL)
    save_file(build(model, tokenizer), str(OUT), metadata={"model": MODEL, "made_by": "edits/directions/build.py"})
    print(f"wrote {OUT}")
