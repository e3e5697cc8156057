"""Evaluation of a trained run: validation metrics and samples, lm-eval tasks, Hugging Face export."""
