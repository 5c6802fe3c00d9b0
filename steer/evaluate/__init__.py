"""Evaluation: SAE quality metrics (`steer.evaluate.sae_metrics`)."""
