"""Survey: ``attncomp.optimize`` on many third-party models that no test names, as a new user would call it.

    python benchmarks/model_survey.py [--only NAME,...] [--repeats 9] [--threads N] [--out DIR]

For each model (random weights, small configs, CPU, float32, eval, ``torch.no_grad()``): build it,
optimize it with default settings (``strategy="auto"``, first-call verification on), compare the
outputs with the original's (relative error of the first tensor output), then time the original
and the optimized model in turns after warm-up (median of ``--repeats`` pairs, ``perf_counter``).
Reports per model: sites replaced / kept / left (with the first reason a site was left), the
speedup original / optimized (> 1: attncomp faster), the error, capture seconds, and any exception.

transformers: encoder, decoder and encoder-decoder families at B=2, L=128 (the second sequence
left-padded by 32 for decoders, right-padded for encoders), each with ``attn_implementation``
"eager" and "sdpa" where the family has both. timm: vision transformers of several attention
designs (plain, windowed, relative-position bias, attention bias, channel attention, spatial
reduction, pooling) at 224², B=2.

Writes ``benchmarks/results/model-survey-cpu-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import attncomp

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=256,
             max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             attention_dropout=0.0, dropout=0.0, pad_token_id=0)

# transformers model types: (type, auto class, kind, extra config)
TEXT = [
    ("bert", "AutoModel", "encoder", {}),
    ("roberta", "AutoModel", "encoder", {}),
    ("distilbert", "AutoModel", "encoder", dict(n_layers=2, dim=64, n_heads=4, hidden_dim=128)),
    ("albert", "AutoModel", "encoder", dict(embedding_size=32)),
    ("electra", "AutoModel", "encoder", dict(embedding_size=32)),
    ("deberta-v2", "AutoModel", "encoder", {}),
    ("xlm-roberta", "AutoModel", "encoder", {}),
    ("gpt2", "AutoModelForCausalLM", "decoder", dict(n_layer=2, n_embd=64, n_head=4, n_positions=512)),
    ("gpt_neox", "AutoModelForCausalLM", "decoder", {}),
    ("opt", "AutoModelForCausalLM", "decoder", dict(ffn_dim=128, word_embed_proj_dim=64)),
    ("bloom", "AutoModelForCausalLM", "decoder", dict(n_layer=2, n_head=4)),
    ("falcon", "AutoModelForCausalLM", "decoder", dict(new_decoder_architecture=True, num_kv_heads=2)),
    ("llama", "AutoModelForCausalLM", "decoder", dict(num_key_value_heads=2)),
    ("mistral", "AutoModelForCausalLM", "decoder", dict(num_key_value_heads=2, sliding_window=32)),
    ("qwen2", "AutoModelForCausalLM", "decoder", dict(num_key_value_heads=2)),
    ("phi", "AutoModelForCausalLM", "decoder", dict(num_key_value_heads=4)),
    ("gemma", "AutoModelForCausalLM", "decoder", dict(num_key_value_heads=1, head_dim=16)),
    ("stablelm", "AutoModelForCausalLM", "decoder", dict(num_key_value_heads=2)),
    ("bart", "AutoModel", "seq2seq", dict(encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
                                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)),
    ("t5", "AutoModel", "seq2seq", dict(num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4,
                                        d_ff=128)),
]

VISION = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224",
          "eva02_tiny_patch14_224", "levit_128s", "xcit_nano_12_p16_224", "pvt_v2_b0", "cait_xxs24_224",
          "coat_lite_tiny", "twins_svt_small", "crossvit_tiny_240", "mobilevit_xxs", "maxvit_tiny_tf_224",
          "efficientformer_l1", "poolformer_s12"]
VISION_SMALL = {"beit_base_patch16_224": dict(depth=2, embed_dim=64, num_heads=4),
                "cait_xxs24_224": dict(depth=2), "xcit_nano_12_p16_224": dict(depth=2)}


def text_case(mt: str, auto: str, kind: str, extra: dict, impl: str, B: int, L: int):
    import transformers as T

    cfg = T.AutoConfig.for_model(mt)
    for k, v in {**SMALL, **extra}.items():
        if hasattr(cfg, k) or k in extra:
            setattr(cfg, k, v)
    if hasattr(cfg, "decoder_start_token_id") and cfg.decoder_start_token_id is None:
        cfg.decoder_start_token_id = 0
    model = getattr(T, auto).from_config(cfg, attn_implementation=impl).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if kind == "decoder":
        mask[1, :L // 4] = 0
    else:
        mask[1, 3 * L // 4:] = 0
    kw = {"attention_mask": mask}
    if kind == "seq2seq":
        kw["decoder_input_ids"] = torch.randint(3, 256, (B, L // 2), generator=g)
    return model, (ids,), kw, mask.bool()


def vision_case(name: str, B: int):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10, **VISION_SMALL.get(name, {})).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(B, *size, generator=torch.Generator().manual_seed(0))
    return model, (x,), {}, None


def cases():
    for mt, auto, kind, extra in TEXT:
        for impl in ("eager", "sdpa"):
            yield f"{mt}-{impl}", (lambda mt=mt, auto=auto, kind=kind, extra=extra, impl=impl:
                                   text_case(mt, auto, kind, extra, impl, 2, 128))
    for name in VISION:
        yield name, (lambda name=name: vision_case(name, 2))


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    raise TypeError(type(out))


def rel_err(a: torch.Tensor, b: torch.Tensor, keep) -> float:
    a, b = a.double(), b.double()
    if keep is not None and a.dim() >= 2 and a.shape[:2] == keep.shape:
        a, b = a[keep], b[keep]
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def timed(fn, args, kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def run_one(name: str, make, repeats: int) -> dict:
    row: dict = {"model": name}
    try:
        torch.manual_seed(0)
        model, args, kw, keep = make()
    except Exception as e:  # a model this transformers / timm build cannot make at this size
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    try:
        with torch.no_grad():
            ref = first_tensor(model(*args, **kw))
    except Exception as e:  # the original model does not run at this size: not attncomp's to answer
        row["skipped"] = f"the original raised {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            fast = attncomp.optimize(model)
            out = first_tensor(fast(*args, **kw))
            row["capture_s"] = round(time.perf_counter() - t0, 2)
            row["rel_err"] = rel_err(out, ref, keep)
            rep = attncomp.explain(fast)
            row.update(replaced=len(rep.replaced), kept=len(getattr(rep, "kept", [])), left=len(rep.left),
                       graphs=rep.graphs, graph_breaks=rep.graph_breaks)
            row["variants"] = sorted({r.plan.variant for r in rep.replaced if r.plan is not None})
            if rep.left:
                row["left_reason"] = str(rep.left[0].reason)[:200]
            for _ in range(2):
                model(*args, **kw)
                fast(*args, **kw)
            pairs = [(timed(model, args, kw), timed(fast, args, kw)) for _ in range(repeats)]
            row["original_ms"] = 1e3 * statistics.median(p[0] for p in pairs)
            row["optimized_ms"] = 1e3 * statistics.median(p[1] for p in pairs)
            row["speedup"] = row["original_ms"] / row["optimized_ms"]
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["traceback"] = traceback.format_exc()[-2000:]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model names (prefix match)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    only = [s for s in a.only.split(",") if s]
    rows = []
    for name, make in cases():
        if only and not any(name.startswith(o) for o in only):
            continue
        row = run_one(name, make, a.repeats)
        rows.append(row)
        if "skipped" in row:
            print(f"{name:34s} skipped: {row['skipped']}", flush=True)
        elif "error" in row:
            print(f"{name:34s} ERROR {row['error'][:200]}", flush=True)
        else:
            print(f"{name:34s} x{row['speedup']:.2f}  err {row['rel_err']:.1e}  {row['replaced']}r/{row['kept']}k/"
                  f"{row['left']}l  {row['original_ms']:.1f}->{row['optimized_ms']:.1f} ms  capture "
                  f"{row['capture_s']}s  {row.get('variants')} {row.get('left_reason', '')[:90]}", flush=True)
    ok = [r for r in rows if "speedup" in r]
    if ok:
        sp = sorted(r["speedup"] for r in ok)
        print(f"{len(ok)} models timed: median x{statistics.median(sp):.2f}, min x{sp[0]:.2f}; "
              f"{sum(s < 0.97 for s in sp)} below 0.97; errors {sum('error' in r for r in rows)}; "
              f"max rel err {max(r['rel_err'] for r in ok):.1e}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model-survey-cpu-{time.strftime('%Y-%m-%d')}{'-partial' if only else ''}.json"
    path.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
                                "torch": torch.__version__, "argv": sys.argv[1:]}, indent=1))
    print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
