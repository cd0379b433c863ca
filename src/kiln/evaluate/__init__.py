"""Evaluation of a model variant (baseline, compressed, references) on the recipe's data."""
