"""Finding what to edit.

- `directions` — steering directions from contrasting prompts (mean difference);
- `atlas` — the feature atlas: per-feature stats, top contexts and top tokens in SQLite, with search;
- `contrast` — features ranked by how differently they fire on two prompt sets, and by output score;
- `logit_lens` — the output tokens a decoder direction promotes and suppresses.
"""
