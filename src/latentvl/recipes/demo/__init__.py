"""``latentvl demo``: five arms on one synthetic task, evaluated with every instrument, and the report.

- :mod:`latentvl.recipes.demo.recipe` - settings, data, the arms' training runs, evaluation, the bars;
- :mod:`latentvl.recipes.demo.report` - report.md, report.json and the plots;
- ``demo.yaml`` - the defaults (package data; ``configs/demo.yaml`` in the repository links to it).
"""
