"""Verification: artifacts against the reference semantics (translation validation)."""
