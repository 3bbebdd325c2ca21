"""Evaluation drivers behind ``mixattn eval``: validation loss/perplexity by
position bucket on MDS data, and retrieval accuracy tables and heatmaps."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mixattn.model import next_token_loss


def mds_batches(path: str | Path, batch_size: int, eos_id: int | None, max_batches: int | None = None) -> Iterable[dict]:
    """Batches (input_ids, labels, doc_ids) from a local MDS split, in order,
    after checking its shards."""
    from mixattn.data import collate, verify_mds_dir
    from mixattn.streams import CheckedStreamingDataset

    verify_mds_dir(path)
    ds = CheckedStreamingDataset(local=str(path), shuffle=False, batch_size=batch_size)
    buf: list[dict] = []
    n = 0
    for sample in ds:
        buf.append(sample)
        if len(buf) == batch_size:
            yield collate(buf, eos_id)
            buf, n = [], n + 1
            if max_batches is not None and n >= max_batches:
                return
    if buf:
        yield collate(buf, eos_id)


def text_batches(inputs, tokenizer, seq_len: int, batch_size: int, max_batches: int | None = None,
                 text_field: str = "text") -> Iterable[dict]:
    """Batches from raw text (text files, JSONL, Parquet: what ``mixattn data``
    reads), tokenized and packed exactly as for training: each document plus
    EOS, concatenated, cut into ``seq_len`` sequences (the last partial one is
    dropped); positions restart after every EOS."""
    from mixattn.data import DataError, collate, iter_documents, pack_document

    buf: list[int] = []
    batch: list[dict] = []
    n = 0
    for text in iter_documents(inputs, text_field):
        ids = tokenizer.encode_batch([text])[0]
        for seq in pack_document(buf, ids, tokenizer.eos_id, seq_len):
            batch.append({"tokens": seq})
            if len(batch) == batch_size:
                yield collate(batch, tokenizer.eos_id)
                batch, n = [], n + 1
                if max_batches is not None and n >= max_batches:
                    return
    if batch:
        yield collate(batch, tokenizer.eos_id)
    elif n == 0:
        raise DataError(f"the text gave {len(buf)} tokens, less than one sequence of {seq_len}; add text or lower --seq-len")


@torch.no_grad()
def loss_by_position(model, batches: Iterable[dict], bucket_edges: Sequence[int]) -> list[dict]:
    """Mean next-token loss and perplexity of the targets at sequence positions
    [edge_i, edge_{i+1}) (the position of the predicted token in its packed
    sequence), plus an "all" row. ``bucket_edges`` ascending, starting at 0 or 1."""
    model.eval()
    edges = sorted(set(bucket_edges))
    sums: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    device = next(model.parameters()).device
    for batch in batches:
        ids = batch["input_ids"].to(device)
        doc_ids = batch.get("doc_ids")
        logits = model(ids, doc_ids=None if doc_ids is None else doc_ids.to(device)).logits
        labels = batch["labels"].to(device)
        nll = next_token_loss(logits, labels, reduction="none")
        keep = labels[:, 1:] != -100
        pos = torch.arange(1, ids.shape[1], device=device).expand_as(keep).contiguous()
        bucket = torch.bucketize(pos, torch.tensor(edges, device=device), right=True) - 1
        for b in range(len(edges)):
            m = keep & (bucket == b)
            sums[b] += float(nll[m].sum())
            counts[b] += int(m.sum())
    rows = []
    for b, lo in enumerate(edges):
        hi = edges[b + 1] if b + 1 < len(edges) else None
        if counts[b]:
            loss = sums[b] / counts[b]
            rows.append({"positions": f"[{lo}, {hi if hi is not None else 'end'})", "tokens": counts[b], "loss": loss,
                         "perplexity": math.exp(loss)})
    total = sum(counts.values())
    if total:
        loss = sum(sums.values()) / total
        rows.append({"positions": "all", "tokens": total, "loss": loss, "perplexity": math.exp(loss)})
    return rows


def retrieval_table(records: Sequence[dict]) -> list[dict]:
    """Mean score per (task, context_tokens bucket, depth)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"], r["depth"])].append(r["score"])
    return [{"task": t, "length": n, "depth": d, "accuracy": sum(v) / len(v), "samples": len(v)}
            for (t, n, d), v in sorted(groups.items())]


def model_label(model, checkpoint: str | Path) -> str:
    """What a plot calls a model: the checkpoint's run folder, its plan (the
    preset's name, or its letters) and depth."""
    from mixattn.checkpoint import run_name
    from mixattn.plan import identify, letters

    plan = identify(model.plan) or f"'{letters(model.plan)}'"
    return f"{run_name(checkpoint)} ({plan}, {len(model.plan)} layers)"


def retrieval_figure(table: Sequence[dict], title: str = ""):
    """The heatmap of :func:`retrieval_heatmap`, as a matplotlib figure. The
    title is wrapped to the figure's width, so it stays inside even for a
    single length."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in table})
    depths = sorted({r["depth"] for r in table})
    grid = [[0.0] * len(lengths) for _ in depths]
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            cell = [r["accuracy"] for r in table if r["depth"] == d and r["length"] == n]
            grid[i][j] = sum(cell) / len(cell) if cell else float("nan")
    width = max(4.5, 1.2 * len(lengths) + 2)
    lines = textwrap.wrap(title, width=int(width * 9)) if title else []
    fig, ax = plt.subplots(figsize=(width, 0.5 * len(depths) + 2 + 0.25 * len(lines)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title("\n".join(lines), fontsize=10)
    fig.tight_layout()
    return fig


def retrieval_heatmap(table: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Accuracy heatmap (context length x needle depth), averaged over tasks."""
    import matplotlib.pyplot as plt

    fig = retrieval_figure(table, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
