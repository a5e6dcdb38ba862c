"""Sweeps: Optuna studies whose trials are ordinary training runs."""
