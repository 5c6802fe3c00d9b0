"""spec → Plan: validation against the model and SAE, unit calibration, SAE slicing."""

from steer.plan.compile import compile
from steer.plan.ir import FeatureReader, Plan, SiteEdit, SitePlan

__all__ = ["FeatureReader", "Plan", "SiteEdit", "SitePlan", "compile"]
