"""Evaluation: ART attacks on held-out inputs, NCCR against baselines on the same rows, the formulation search."""
