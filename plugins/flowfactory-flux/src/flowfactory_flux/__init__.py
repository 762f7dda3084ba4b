"""FLUX.1 policy plugin (placeholder module until the policy lands)."""
