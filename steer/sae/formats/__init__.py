"""SAE file formats: SAELens (v5/v6, read and write), Gemma Scope params.npz, EleutherAI sparsify."""
