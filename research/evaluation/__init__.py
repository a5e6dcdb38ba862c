"""Evaluating finished runs: the exact detection metrics (metrics), scoring a run's checkpoint
on a whole split and saving the report (run), its figures (report), and comparing runs
(compare). The in-loop evaluator stays in research.training.evaluator."""
