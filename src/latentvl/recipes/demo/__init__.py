"""``latentvl demo``: five arms on one synthetic task, evaluated with every instrument, and the report.

- :mod:`latentvl.recipes.demo.recipe` - settings, data, the arms' training runs, evaluation, the timings;
- :mod:`latentvl.recipes.demo.bars` - the bars: the figure each reads, its direction, the one check;
- :mod:`latentvl.recipes.demo.report` - report.md, report.json and the plots;
- :mod:`latentvl.recipes.demo.seeds` - the demo once per seed (``--seeds``) and seeds.md / seeds.json;
- ``demo.yaml`` - the defaults (package data; ``configs/demo.yaml`` in the repository links to it).
"""
