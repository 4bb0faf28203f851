"""Text the user sees about a run: speed, context, expert usage. Rendering only, no state."""
from __future__ import annotations


def kernel_label(model) -> str:
    """'avx2 int8x2': the instruction-set tier and activation mode the model runs with."""
    return getattr(model.kernels, "label", "numpy reference")


def format_stats(model, st) -> str:
    """One compact block for stderr / the REPL's /stats."""
    cfg = model.config
    es = model.experts.stats
    lines = [
        f"prompt {st.prompt_tokens} tok ({st.prefilled_tokens} run, {st.prefill_tps:.1f} tok/s) | "
        f"generated {st.completion_tokens} tok ({st.decode_tps:.2f} tok/s) | "
        f"first token {st.first_token_seconds:.2f} s",
        f"context {model.pos}/{model.ctx} tokens | threads {model.threads} | kernels {kernel_label(model)}",
    ]
    if cfg.moe and es.tokens:
        used = (es.counts > 0).sum()
        total = es.counts.size
        per_tok = es.bytes_read / max(es.tokens, 1)
        lines.append(
            f"experts: {used}/{total} (layer, expert) pairs used | "
            f"{per_tok / 2**20:.1f} MiB of expert weights read per token"
        )
    cache = getattr(model.experts, "cache_stats", None)
    if callable(cache):
        lines.append(cache())
    return "\n".join(lines)
