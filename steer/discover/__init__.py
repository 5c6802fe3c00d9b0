"""Finding what to edit: directions from contrasting prompts (features come with the atlas)."""
