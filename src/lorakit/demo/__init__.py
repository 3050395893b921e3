"""`make demo`: the booking task (task.py, with examples/demo/recipe.yaml) and the run that shows it (run.py)."""
