"""Reports: the markdown text, JSON and plots of evaluation and halting. A report reads what
:mod:`latentvl.evaluation` measured and writes it; :func:`latentvl.reports.evaluation.evaluate` is the one
entry that does both in order (it calls :func:`latentvl.evaluation.generated.evaluate_generated`, then
writes the files). The demo's report lives with its recipe (:mod:`latentvl.recipes.demo.report`)."""
