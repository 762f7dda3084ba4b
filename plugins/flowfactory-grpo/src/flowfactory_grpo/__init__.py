"""Flow-GRPO optimizer plugin."""
