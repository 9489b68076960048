"""The synthetic visual chain-of-thought tasks, one module each, over one writer and one registry.

- :mod:`.common`: :class:`~.common.Sample`, the shared colours, image-side and file helpers;
- :mod:`.a5`, :mod:`.relay`, :mod:`.maze`, :mod:`.shapes`: the ``latentvl make-data`` tasks;
- :mod:`.relay_bands`: the ``latentvl make-relay-bands`` task (hops vary, the CoT strip does not);
- :mod:`.registry`: task name -> generator, knobs and their checks, :func:`~.registry.implied_answer`;
- :mod:`.writer`: :func:`~.writer.make_dataset` and :func:`~.writer.make_relay_bands` (PNGs, JSONL splits,
  annotations and ``meta.json``, every file written atomically).
"""
