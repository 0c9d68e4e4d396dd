"""Write the PEFT golden fixtures that tests/test_artifact_peft.py compares against.

Re-run from the repository root, in an environment with PyTorch, transformers and PEFT::

    pip install torch transformers==5.* peft==0.21.2   # or: pip install -e '.[fixtures]' peft==0.21.2
    python tests/make_peft_golden.py

The test suite never imports torch or peft: it reads what this script wrote. Everything is
seeded, so re-running rewrites the same tensors.

For each case ``NAME`` it writes ``tests/fixtures/peft/NAME/``:

* ``adapter_config.json`` and ``adapter_model.safetensors``: PEFT's own ``save_pretrained`` of
  a prompt-tuning or prefix-tuning model built with ``get_peft_model`` on a tiny fixture
  checkpoint (``tests/fixtures/{gpt2,llama,bert}``), its prompt re-drawn at random;
* ``outputs.npz``: ``input_ids``, ``attention_mask`` (row 1 right-padded) and PEFT's outputs for
  them, from the adapter re-loaded with ``PeftModel.from_pretrained``: ``logits`` (causal LM) or
  ``hidden`` (the encoder's last hidden state), with the virtual tokens first for prompt tuning.

Cases: GPT-2 and Llama (grouped-query attention) causal LM with prompt tuning and prefix
tuning, GPT-2 prefix tuning with ``prefix_projection=True`` (PEFT saves the projected prefix),
and BERT prompt/prefix tuning for ``SEQ_CLS`` and ``FEATURE_EXTRACTION``.

Then it checks fedprompt's side against PEFT, and writes ``tests/fixtures/peft/report.json``:
for each case, fedprompt imports PEFT's adapter (:func:`fedprompt.wire.peft.import_peft`),
saves it as an ``.fpp`` and exports it again (:func:`fedprompt.wire.peft.export_peft`), and
PEFT loads *that* export with ``PeftModel.from_pretrained``. The report records that it loaded,
the largest difference of its outputs from PEFT's own adapter, whether the weight files are
byte-identical, and the SHA-256 of fedprompt's exported weights and its config, so the test can
check that today's export is still the one PEFT loaded.

PEFT 0.21.2 with transformers 5.24 cannot run prefix tuning for ``SEQ_CLS`` on BERT (it looks for
a ``past_key_values`` argument that transformers 5 renamed ``cache``); for that case the
outputs are BERT's base model run on PEFT's own prefix cache (``PeftModel.get_prompt``), which is
what PEFT's forward would do, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

import numpy as np
import peft
import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path("tests/fixtures")  # relative: PEFT records the base model path as given
OUT = FIXTURES / "peft"
BATCH, SEQ, PAD_ROW1, P = 2, 6, 2, 3

# name -> (base fixture, model class, task type, PEFT config kwargs)
CASES = {
    "gpt2_prompt": ("gpt2", "causal", "CAUSAL_LM", dict(kind="prompt")),
    "gpt2_prefix": ("gpt2", "causal", "CAUSAL_LM", dict(kind="prefix")),
    "gpt2_prefix_projection": ("gpt2", "causal", "CAUSAL_LM", dict(kind="prefix", prefix_projection=True, encoder_hidden_size=16)),
    "llama_prompt": ("llama", "causal", "CAUSAL_LM", dict(kind="prompt")),
    "llama_prefix": ("llama", "causal", "CAUSAL_LM", dict(kind="prefix")),
    "bert_prompt_seq_cls": ("bert", "seq_cls", "SEQ_CLS", dict(kind="prompt")),
    "bert_prefix_seq_cls": ("bert", "seq_cls", "SEQ_CLS", dict(kind="prefix")),
    "bert_prompt_features": ("bert", "features", "FEATURE_EXTRACTION", dict(kind="prompt")),
    "bert_prefix_features": ("bert", "features", "FEATURE_EXTRACTION", dict(kind="prefix")),
}
NUM_LABELS = 3


def _base(fixture: str, head: str):
    path = str(FIXTURES / fixture)
    kwargs = dict(attn_implementation="eager", dtype=torch.float32)
    if head == "causal":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif head == "seq_cls":
        torch.manual_seed(1)  # the classifier transformers adds is random: make it the same every time
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS, **kwargs)
    else:
        model = transformers.AutoModel.from_pretrained(path, **kwargs)
    return model.eval()


def _peft_config(task_type: str, kind: str, **kwargs):
    if kind == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=P, **kwargs)
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P, **kwargs)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(123)
    ids = torch.randint(3, 100, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - PAD_ROW1 :] = 0
    return ids, mask


def _outputs(model, head: str, ids, mask, kind: str) -> tuple[dict[str, np.ndarray], str | None]:
    """PEFT's outputs for the fixed inputs, and a note when PEFT's forward had to be bypassed."""
    with torch.no_grad():
        if head == "causal":
            return {"logits": model(input_ids=ids, attention_mask=mask).logits.float().numpy()}, None
        if head == "features":
            return {"hidden": model(input_ids=ids, attention_mask=mask).last_hidden_state.float().numpy()}, None
        try:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            return {"hidden": out.hidden_states[-1].float().numpy(), "class_logits": out.logits.float().numpy()}, None
        except ValueError as err:
            if kind != "prefix":
                raise
            cache = model.get_prompt(batch_size=ids.shape[0])
            ext = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], dim=1)
            hidden = model.base_model.bert(input_ids=ids, attention_mask=ext, cache=cache).last_hidden_state
            note = f"PEFT's SEQ_CLS prefix forward fails here ({err}); outputs are BERT run on PEFT's get_prompt() cache"
            return {"hidden": hidden.float().numpy()}, note


def make_case(name: str) -> tuple[dict[str, np.ndarray], str | None]:
    fixture, head, task_type, spec = CASES[name]
    spec = dict(spec)
    kind = spec.pop("kind")
    torch.manual_seed(0)
    model = get_peft_model(_base(fixture, head), _peft_config(task_type, kind, **spec))
    with torch.no_grad():  # a prompt far from PEFT's init, so that a wrong layout cannot pass
        for param in model.prompt_encoder["default"].parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)
    loaded = PeftModel.from_pretrained(_base(fixture, head), folder).eval()
    ids, mask = _inputs()
    outputs, note = _outputs(loaded, head, ids, mask, kind)
    np.savez(folder / "outputs.npz", input_ids=ids.numpy().astype(np.int32), attention_mask=mask.numpy().astype(np.int32), **outputs)
    return outputs, note


def check_fedprompt_export(name: str, peft_outputs: dict[str, np.ndarray]) -> dict:
    """Import PEFT's adapter with fedprompt, export it again, and have PEFT load that export."""
    import fedprompt
    from fedprompt.wire import peft as fp_peft
    from fedprompt.wire.artifact import load_prompt, save_prompt

    fixture, head, task_type, spec = CASES[name]
    folder = OUT / name
    backbone = fedprompt.load_backbone(FIXTURES / fixture)
    adapter = fp_peft.read_peft_adapter(folder)
    params = {"prompt": adapter.params, "head": {}}
    task = None
    if task_type == "SEQ_CLS":
        tensors = fp_peft.read_safetensors(folder / fp_peft.ADAPTER_WEIGHTS)
        params["head"] = {"w": tensors["base_model.classifier.weight"].T.copy(), "b": tensors["base_model.classifier.bias"]}
        task = fedprompt.SequenceClassification(num_labels=NUM_LABELS, pooling="cls")
    with tempfile.TemporaryDirectory() as tmp:
        fpp = pathlib.Path(tmp) / "prompt.fpp"
        save_prompt(fpp, params, config=adapter.prompt_config, backbone=backbone, task=task, storage="float32")
        artifact = load_prompt(fpp, backbone=backbone)
        ours = pathlib.Path(tmp) / "ours"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the SEQ_CLS head warning
            fp_peft.export_peft(artifact, ours, base_model_name_or_path=adapter.base_model_name_or_path, task_type=task_type)
        loaded = PeftModel.from_pretrained(_base(fixture, head), ours).eval()
        ids, mask = _inputs()
        outputs, _ = _outputs(loaded, head, ids, mask, spec["kind"])
        diff = max(float(np.max(np.abs(outputs[k] - peft_outputs[k]))) for k in peft_outputs if k in outputs)
        weights = (ours / fp_peft.ADAPTER_WEIGHTS).read_bytes()
        return {
            "peft_loaded_fedprompt_export": isinstance(loaded, PeftModel),
            "peft_class": type(loaded).__name__,
            "max_abs_diff_vs_peft_adapter": diff,
            "weights_bytes_equal_to_peft": weights == (folder / fp_peft.ADAPTER_WEIGHTS).read_bytes(),
            "export_weights_sha256": hashlib.sha256(weights).hexdigest(),
            "export_config": json.loads((ours / fp_peft.ADAPTER_CONFIG).read_text()),
        }


def main() -> None:
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    report = {"peft_version": peft.__version__, "transformers_version": transformers.__version__, "cases": {}}
    for name in CASES:
        outputs, note = make_case(name)
        entry = check_fedprompt_export(name, outputs)
        if note:
            entry["note"] = note
        report["cases"][name] = entry
        print(f"{name}: PEFT loaded fedprompt's export: {entry['peft_loaded_fedprompt_export']}, "
              f"max diff {entry['max_abs_diff_vs_peft_adapter']:.2e}, identical weights file: {entry['weights_bytes_equal_to_peft']}")
    (OUT / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
