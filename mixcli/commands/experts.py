"""`mixcli experts MODEL --prompt TEXT`: which experts the router chose, layer by layer.

Why a user wants it: whether an expert cache can help depends on the routing. A heatmap that is
flat means every expert is equally likely (a budget buys little); hot columns mean a few experts
carry most tokens (LFU keeps them); high reuse between consecutive tokens means recency pays. The
prompt and the generated tokens are shown apart because prefill and decode route differently.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import typer

from ..errors import UsageError
from .generate import CtxOpt, ModelArg, ThreadsOpt, read_prompt


class RouterRecorder:
    """An ``ExpertProvider`` around the model's own: records each token's top-K experts per layer
    as the router chose them (``on_route``), split by phase, and passes every call on."""

    def __init__(self, inner, n_layers: int, k: int):
        self.inner = inner
        self.stats = inner.stats
        self.k = k
        self.phase = "prompt"
        self.records: dict[str, list[list[np.ndarray]]] = {}  # phase -> layer -> [[T, K] int]
        self.n_layers = n_layers

    def attach(self, model) -> None:
        self.inner.attach(model)

    def on_route(self, layer, x, experts):
        rec = self.records.setdefault(self.phase, [[] for _ in range(self.n_layers)])
        rec[layer].append(experts.copy())  # [T, K]
        self.inner.on_route(layer, x, experts)

    def get(self, layer, expert, n_tokens):
        return self.inner.get(layer, expert, n_tokens)

    def choices(self, phase: str) -> list[np.ndarray]:
        """Per layer: [T, K] experts chosen for each token of the phase (in token order)."""
        rec = self.records.get(phase)
        if not rec:
            return []
        return [np.concatenate(r) if r else np.zeros((0, self.k), np.int64) for r in rec]


def routing_summary(choices: np.ndarray, n_experts: int) -> tuple[np.ndarray, float]:
    """choices [T, K] of one layer -> (share [E] of tokens that chose each expert, reuse): reuse is
    the mean fraction of a token's K experts that the previous token also chose (chance: K/E)."""
    T, K = choices.shape
    share = np.bincount(choices.ravel(), minlength=n_experts)[:n_experts] / max(T, 1)  # [E]
    if T < 2:
        return share, float("nan")
    onehot = np.zeros((T, n_experts), bool)  # [T, E]
    np.put_along_axis(onehot, choices, True, axis=1)
    overlap = (onehot[1:] & onehot[:-1]).sum(axis=1)  # [T-1]
    return share, float(overlap.mean() / K)


def heatmap(title: str, choices: list[np.ndarray], n_experts: int, k: int):
    """A rich Group: a title line, a Table with one row per layer and one cell per expert shaded by
    its share of tokens, and the legend (title and legend as lines of their own: at 80 columns
    a table's title or caption would be squeezed into the table's width)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    T = choices[0].shape[0] if choices else 0
    t = Table()
    t.add_column("layer", justify="right")
    for e in range(n_experts):
        t.add_column(str(e), justify="center")
    t.add_column("reuse", justify="right")
    uniform = k / n_experts
    for li, ch in enumerate(choices):
        share, reuse = routing_summary(ch, n_experts)
        cells = []
        for s in share:
            level = int(round(min(s / max(2 * uniform, 1e-9), 1.0) * 255))  # 2x the uniform share = full
            style = f"black on rgb({level},{int(level * 0.55)},{255 - level})"
            cells.append(Text(f"{s:4.0%}", style=style))
        t.add_row(str(li), *cells, "-" if np.isnan(reuse) else f"{reuse:.0%}")
    legend = (
        f"reuse: share of a token's experts the previous token also chose (chance {uniform:.0%}); "
        f"colour: blue = unused, orange = twice the uniform share ({2 * uniform:.0%}) or more"
    )
    return Group(
        Text(f"{title}: {T} tokens, top-{k} of {n_experts} experts (share of tokens)", style="bold"),
        t,
        Text(legend, style="dim"),
    )


def experts_command(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text, or - to read stdin.")] = ...,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Tokens to generate (greedy) after the prompt.")
    ] = 32,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--raw", help="Wrap the prompt in the model's chat template (default when it has one)."),
    ] = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
):
    """Show which experts the router chose, layer by layer.

    A heatmap per layer over the prompt and the generated tokens, and how often consecutive tokens
    reuse an expert."""
    from rich.console import Console

    from ..generate import generate
    from ..progress import say_stderr
    from ..runtime import load_runtime
    from ..sampling import SamplerConfig, make_sampler

    if max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {max_tokens}")
    text = read_prompt(prompt)
    if not text.strip():
        raise UsageError("the prompt is empty", "pass --prompt TEXT or pipe text to --prompt -")
    notify = say_stderr
    rt = load_runtime(model, ctx=ctx, threads=threads, notify=notify)
    cfg = rt.model.config
    if not cfg.moe:
        raise UsageError(
            f"{rt.name} is a dense model (one expert per layer): there is no router to show",
            "pick a Mixture-of-Experts model such as Mixtral",
        )
    use_chat = (rt.template is not None) if chat is None else chat
    tokens = rt.chat_prompt([{"role": "user", "content": text}])[0] if use_chat else rt.raw_prompt(text)
    rec = RouterRecorder(rt.model.experts, cfg.num_hidden_layers, cfg.num_experts_per_tok)
    rt.model.experts = rec
    out = []
    sampler = make_sampler(SamplerConfig(temperature=0.0))
    for resp in generate(rt.model, rt.tokenizer, tokens, sampler, max_tokens=max_tokens, reuse_cache=False):
        rec.phase = "generated"  # everything after the prompt's prefill routes generated tokens
        out.append(resp.text)
    con = Console()
    con.print(heatmap("prompt", rec.choices("prompt"), cfg.num_local_experts, cfg.num_experts_per_tok))
    gen = rec.choices("generated")
    if gen and gen[0].shape[0]:
        con.print(heatmap("generated", gen, cfg.num_local_experts, cfg.num_experts_per_tok))
    notify(f"generated: {''.join(out)!r}")
