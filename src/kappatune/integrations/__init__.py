"""Bridges to the tools users already train with (HF Trainer, PEFT)."""
