"""Text the user sees about a run: speed, context, expert usage, the expert cache. Rendering only,
no state: `generate --stats`, the REPL's /stats and answer line, and `bench` format through here."""

from __future__ import annotations

from .memsize import format_size


def kernel_label(model) -> str:
    """'avx2 int8x2': the instruction-set tier and activation mode the model runs with."""
    return getattr(model.kernels, "label", "numpy reference")


def context_line(model) -> str:
    return f"context {model.pos}/{model.ctx} tokens | threads {model.threads} | kernels {kernel_label(model)}"


def format_stats(model, st) -> str:
    """One compact block for stderr / the REPL's /stats: the run ``st`` (GenerationStats), the
    context, the experts it read and, under --max-memory, what the expert cache did."""
    es = model.experts.stats
    lines = [
        f"prompt {st.prompt_tokens} tok ({st.prefilled_tokens} run, {st.prefill_tps:.1f} tok/s) | "
        f"generated {st.completion_tokens} tok ({st.decode_tps:.2f} tok/s) | "
        f"first token {st.first_token_seconds:.2f} s",
        context_line(model),
    ]
    if model.config.moe and es.tokens:
        used = (es.counts > 0).sum()
        total = es.counts.size
        per_tok = es.bytes_read / max(es.tokens, 1)
        lines.append(
            f"experts: {used}/{total} (layer, expert) pairs used | "
            f"{per_tok / 2**20:.1f} MiB of expert weights read per token"
        )
    cache = cache_report(model)
    if cache:
        lines.append(cache)
    return "\n".join(lines)


def cache_report(model) -> str | None:
    """What the expert cache did since its counters were reset (None without --max-memory's
    cache): its size and policy, hits, disk traffic, how often the next-layer guess was right."""
    from .expert_cache import ExpertCache

    cache = model.experts
    if not isinstance(cache, ExpertCache):
        return None
    c = cache.cstats
    tok = max(c.tokens, 1)
    lines = [
        f"expert cache: {cache.n_slots} slots x {format_size(cache.slot_bytes)} = {format_size(cache.capacity_bytes)} "
        f"(+ {format_size(cache.pinned_bytes)} pinned, budget {format_size(cache.max_memory)}) | policy {cache.policy}"
        f"{' + prefetch' if cache.prefetch else ''}",
        f"  hits {c.hit_rate:.0%} ({c.hits}/{c.requests}; {c.prefetch_hits} read ahead, {c.guess_hits} of them "
        f"guessed a layer early) | waited {c.waits} | "
        f"missed {c.misses} | evictions {c.evictions} | disk {format_size(c.bytes_loaded / tok)}/token "
        f"({format_size(c.bytes_missed / tok)} on the critical path) | stalled {c.stall_seconds:.2f} s",
    ]
    if c.predicted:
        lines.append(
            f"  next-layer guess right {c.prefetch_accuracy:.0%} ({c.predicted_right}/{c.predicted}; "
            f"without norm correction {c.predicted_right_raw / c.predicted:.0%}) | "
            f"read ahead but unused {format_size(c.bytes_wasted)}"
            + (f" | {c.guesses_skipped} guesses not read (too often wrong)" if c.guesses_skipped else "")
        )
    return "\n".join(lines)


def expert_share_line(model) -> str | None:
    """Each expert's share of the routed (token, expert) assignments, summed over layers."""
    if not model.config.moe:
        return None
    counts = model.experts.stats.counts  # [L, E]
    total = int(counts.sum())
    if not total:
        return None
    per = counts.sum(axis=0) / total  # [E]
    parts = " ".join(f"{e}:{p:.0%}" for e, p in enumerate(per))
    return f"expert share of routed tokens (all layers): {parts}"


def answer_footer(model, st, finish: str | None) -> str:
    """The REPL's line under an answer: tokens, speed, prompt reuse, context, why it stopped."""
    why = {"interrupted": " · stopped (Ctrl-C)", "length": " · stopped: length limit"}.get(finish or "", "")
    return (
        f"[{st.completion_tokens} tok · {st.decode_tps:.1f} tok/s · prompt {st.prompt_tokens} tok "
        f"({st.prefilled_tokens} new, {st.prefill_tps:.0f} tok/s) · context {model.pos}/{model.ctx}{why}]"
    )
