"""In-context-learning tasks from local JSONL files: ``mixattn eval icl``.

One example per line, in one of two forms (a file may mix them)::

    {"type": "mc", "context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}
    {"type": "gen", "prompt": "2 + 2 =", "answers": [" 4", "4"], "stop": ["\\n"]}

``mc`` (multiple choice) is scored by log-likelihood: the model's summed log
probability of each choice's tokens after the context; ``acc`` counts the
argmax, ``acc_norm`` the argmax of log-likelihood per character of the choice
(as lm-evaluation-harness does). ``gen`` is greedy generation up to
``max_new_tokens`` or the first stop string, scored 1 when the stripped
output equals a stripped answer. With ``shots`` K > 0 every example is
preceded by K other examples of the same file (seeded choice), each written
out with its answer and joined by ``separator``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mixattn.generate import generate


class ICLError(ValueError):
    pass


@dataclass
class Example:
    kind: str  # "mc" | "gen"
    context: str
    choices: list[str] | None = None
    answer: int | None = None
    answers: list[str] | None = None
    stop: list[str] | None = None

    def demonstration(self) -> str:
        """The example written out with its answer, for few-shot prompts."""
        return self.context + (self.choices[self.answer] if self.kind == "mc" else self.answers[0])


def _field(record: dict, name: str, kind, where: str):
    if name not in record:
        raise ICLError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ICLError(f"{where}: field {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def load_task(path: str | Path) -> list[Example]:
    """Examples from a JSONL file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ICLError(f"task file {str(p)!r} does not exist")
    examples = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ICLError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ICLError(f"{where}: each line must be a JSON object")
        kind = rec.get("type")
        if kind == "mc":
            choices = _field(rec, "choices", list, where)
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise ICLError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
            answer = _field(rec, "answer", int, where)
            if not 0 <= answer < len(choices):
                raise ICLError(f"{where}: answer {answer} is not an index of the {len(choices)} choices (0..{len(choices) - 1})")
            examples.append(Example("mc", _field(rec, "context", str, where), choices=choices, answer=answer))
        elif kind == "gen":
            answers = _field(rec, "answers", list, where)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise ICLError(f"{where}: 'answers' must be a non-empty list of strings")
            stop = rec.get("stop", [])
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
                raise ICLError(f"{where}: 'stop' must be a list of non-empty strings")
            examples.append(Example("gen", _field(rec, "prompt", str, where), answers=answers, stop=stop))
        else:
            raise ICLError(f"{where}: 'type' must be 'mc' or 'gen', got {kind!r}")
    if not examples:
        raise ICLError(f"task file {str(p)!r} has no examples")
    return examples


def _prompt(examples: Sequence[Example], i: int, shots: int, separator: str, rng: random.Random) -> str:
    if shots <= 0:
        return examples[i].context
    others = [j for j in range(len(examples)) if j != i]
    if len(others) < shots:
        raise ICLError(f"shots={shots} needs at least {shots + 1} examples in the file, it has {len(examples)}")
    demos = [examples[j].demonstration() for j in rng.sample(others, shots)]
    return separator.join([*demos, examples[i].context])


@torch.no_grad()
def loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16) -> list[float]:
    """Summed log-probability of each continuation's tokens after its context
    (token ids). The context is cut from the left to fit max_seq_len."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs, spans = [], []
        for ctx, cont in chunk:
            if not cont:
                raise ICLError("a continuation tokenized to nothing")
            if len(cont) >= limit:
                raise ICLError(f"a continuation of {len(cont)} tokens does not fit max_seq_len {limit} with any context")
            ids = (ctx + cont)[-limit:]
            seqs.append(ids)
            spans.append((len(ids) - len(cont), len(ids)))
        width = max(len(s) for s in seqs)
        x = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, :len(s)] = torch.tensor(s)  # right padding: causal attention never sees it
        logp = model(x.to(device)).logits.float().log_softmax(-1)
        for r, (lo, hi) in enumerate(spans):
            targets = x[r, lo:hi].to(device)
            out.append(float(logp[r, lo - 1:hi - 1].gather(-1, targets[:, None]).sum()))
    return out


def evaluate_task(model, tokenizer, examples: Sequence[Example], shots: int = 0, separator: str = "\n\n", seed: int = 0,
                  max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """Scores of one task: per-example records and the mean metrics."""
    rng = random.Random(seed)
    prompts = [_prompt(examples, i, shots, separator, rng) for i in range(len(examples))]
    records = []
    mc = [i for i, e in enumerate(examples) if e.kind == "mc"]
    if mc:
        pairs, owners = [], []
        for i in mc:
            ctx = tokenizer.encode_batch([prompts[i]])[0]
            for c, ids in enumerate(tokenizer.encode_batch(examples[i].choices)):
                pairs.append((ctx, ids))
                owners.append((i, c))
        scores = loglikelihoods(model, pairs, batch_size)
        by: dict[int, list[float]] = {}
        for (i, _), s in zip(owners, scores):
            by.setdefault(i, []).append(s)
        for i in mc:
            ll = by[i]
            norm = [s / len(c) for s, c in zip(ll, examples[i].choices)]
            records.append({"index": i, "type": "mc", "loglikelihoods": ll, "answer": examples[i].answer,
                            "acc": float(max(range(len(ll)), key=ll.__getitem__) == examples[i].answer),
                            "acc_norm": float(max(range(len(norm)), key=norm.__getitem__) == examples[i].answer)})
    gen = [i for i, e in enumerate(examples) if e.kind == "gen"]
    room = model.cfg.max_seq_len - max_new_tokens
    if gen and room < 1:
        raise ICLError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in max_seq_len {model.cfg.max_seq_len}")
    for start in range(0, len(gen), batch_size):  # batched greedy generation, prompts cut from the left to fit
        idx = gen[start:start + batch_size]
        ids = [t[-room:] for t in tokenizer.encode_batch([prompts[i] for i in idx])]
        outs = generate(model, ids, max_new_tokens, stop_tokens=[tokenizer.eos_id]).tokens
        for i, out in zip(idx, outs):
            e = examples[i]
            text = tokenizer.decode([t for t in out if t != tokenizer.eos_id])
            for stop in e.stop:
                text = text.split(stop, 1)[0]
            records.append({"index": i, "type": "gen", "output": text, "answers": e.answers,
                            "exact_match": float(text.strip() in {a.strip() for a in e.answers})})
    records.sort(key=lambda r: r["index"])
    metrics = {}
    for key in ("acc", "acc_norm", "exact_match"):
        vals = [r[key] for r in records if key in r]
        if vals:
            metrics[key] = sum(vals) / len(vals)
    return {"examples": len(examples), "shots": shots, **metrics, "records": records}
