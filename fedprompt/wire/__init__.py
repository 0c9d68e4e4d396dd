"""What travels between parties, and what is written to disk.

* :mod:`fedprompt.wire.codec`: a msgpack codec for pytrees of arrays (prompt updates, global
  prompts, SCAFFOLD control variates). :func:`~fedprompt.wire.codec.decode` treats its input
  as hostile: sizes, nesting, dtypes and lengths are bounded and checked, and every bad input
  raises :class:`fedprompt.errors.WireError`. :func:`~fedprompt.wire.codec.check_template`
  then checks a decoded tree against the tree the receiver expects.
* :mod:`fedprompt.wire.artifact`: the prompt artifact (``.fpp``), one encoded message on disk,
  written atomically.
"""
