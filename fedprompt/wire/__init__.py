"""What travels between parties, and what is written to disk.

* :mod:`fedprompt.wire.codec`: a msgpack codec for pytrees of arrays (prompt updates, global
  prompts, SCAFFOLD control variates). :func:`~fedprompt.wire.codec.decode` treats its input
  as hostile: sizes, nesting, dtypes and lengths are bounded and checked, and every bad input
  raises :class:`fedprompt.errors.WireError`. :func:`~fedprompt.wire.codec.check_template`
  then checks a decoded tree against the tree the receiver expects.
* :mod:`fedprompt.wire.artifact`: the prompt artifact (``.fpp``, schema version 2): the prompt,
  head, backbone fingerprint, tokenizer hash, task and training facts under a SHA-256 checksum,
  written atomically, optionally in float16 or int8; read as hostile input.
* :mod:`fedprompt.wire.peft`: Hugging Face PEFT prompt-tuning and prefix-tuning adapters
  (``adapter_config.json`` + ``adapter_model.safetensors``), exported and imported.
"""
