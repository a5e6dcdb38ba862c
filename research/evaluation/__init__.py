"""Evaluating finished runs: scoring a run's checkpoint on a whole split and saving the report
(run), its figures (report), and comparing runs (compare). The in-loop evaluator stays in
research.training.evaluator; the exact metrics both use are research.metrics, a leaf module,
so that training never imports this package."""
